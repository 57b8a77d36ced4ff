"""Noise schedules: beta_t for t = 0..T-1 and every coefficient derived from them.

Notation (Ho et al. 2020): alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s, and the
forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). Index t = 0 is the first
noising step, as in the original code (the paper's t = 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine", "scaled_linear", "sigmoid")


class Schedule(NamedTuple):
    """All per-timestep coefficients of a discrete diffusion process, each of shape (T,).

    A NamedTuple, hence a pytree: pass it through `jax.jit` as an argument.
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray  # abar_t
    alphas_cumprod_prev: jnp.ndarray  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray  # 1 / sqrt(abar_t)
    sqrt_recipm1_alphas_cumprod: jnp.ndarray  # sqrt(1 / abar_t - 1)
    posterior_variance: jnp.ndarray  # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_log_variance_clipped: jnp.ndarray  # log beta~_t, with beta~_0 := beta~_1
    posterior_mean_coef1: jnp.ndarray  # multiplies x_0 in mu~_t
    posterior_mean_coef2: jnp.ndarray  # multiplies x_t in mu~_t
    snr: jnp.ndarray  # abar_t / (1 - abar_t)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """beta_t evenly spaced from beta_start to beta_end (Ho et al. 2020)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """sqrt(beta_t) evenly spaced (latent diffusion / Stable Diffusion)."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def betas_from_alpha_bar(alpha_bar, num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """beta_t = min(1 - abar((t+1)/T) / abar(t/T), max_beta) for a continuous abar on [0, 1]."""
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    abar = alpha_bar(s)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def cosine_alpha_bar(s: np.ndarray, offset: float = 0.008) -> np.ndarray:
    """f(s) = cos^2(((s + offset) / (1 + offset)) * pi / 2) (Eq. 17 of Nichol & Dhariwal)."""
    return np.cos((s + offset) / (1.0 + offset) * math.pi / 2) ** 2


def sigmoid_alpha_bar(s: np.ndarray, start=-3.0, end=3.0, tau=1.0) -> np.ndarray:
    """abar(s) = (sig(e/tau) - sig((s (e - b) + b)/tau)) / (sig(e/tau) - sig(b/tau)).

    b = start, e = end.

    The sigmoid schedule of Jabri et al. 2022 ("Scalable adaptive computation", RIN) and
    Chen 2023 ("On the importance of noise scheduling"), clipped away from 0 at s = 1.
    """

    def sig(z):
        return 1.0 / (1.0 + np.exp(-z))

    v_start, v_end = sig(start / tau), sig(end / tau)
    value = (v_end - sig((s * (end - start) + start) / tau)) / (v_end - v_start)
    return np.clip(value, 1e-9, 1.0)


def make_schedule(
    name: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> Schedule:
    """Builds a `Schedule` by name.

    Args:
      name: "linear" (DDPM: 1e-4..0.02 at T=1000; for other T both ends scale by 1000/T as in
        improved DDPM, so the process reaches the same noise level), "cosine" (Nichol &
        Dhariwal, offset `cosine_s`, betas clipped at `max_beta`), "scaled_linear" (Stable
        Diffusion: 0.00085..0.012 in sqrt-space), "sigmoid" (Jabri et al., start=-3, end=3).
      num_timesteps: T, any positive integer.
      beta_start, beta_end: overrides of the linear and scaled_linear end points.

    Returns:
      A Schedule whose arrays have shape (T,) and the default float dtype (float32, or float64
      under `jax.experimental.enable_x64`).
    """
    if num_timesteps < 1:
        raise ValueError(f"diffusion.num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        start = scale * 1e-4 if beta_start is None else beta_start
        end = scale * 0.02 if beta_end is None else beta_end
        betas = linear_betas(num_timesteps, start, end)
    elif name == "scaled_linear":
        start = 0.00085 if beta_start is None else beta_start
        end = 0.012 if beta_end is None else beta_end
        betas = scaled_linear_betas(num_timesteps, start, end)
    elif name == "cosine":
        betas = betas_from_alpha_bar(
            lambda s: cosine_alpha_bar(s, cosine_s), num_timesteps, max_beta
        )
    elif name == "sigmoid":
        betas = betas_from_alpha_bar(sigmoid_alpha_bar, num_timesteps, max_beta)
    else:
        raise ValueError(f"unknown diffusion.schedule {name!r}; choose one of {SCHEDULES}")
    if not (betas.min() > 0 and betas.max() < 1):
        raise ValueError(
            f"diffusion.num_timesteps={num_timesteps}: the {name} betas span "
            f"[{betas.min():.4g}, {betas.max():.4g}], outside (0, 1); use more timesteps or "
            "set diffusion.beta_start/beta_end"
        )
    return schedule_from_betas(betas)


def schedule_from_betas(betas) -> Schedule:
    """Derives every coefficient of a `Schedule` from beta_t, shape (T,).

    The cumulative product runs in float64 NumPy when `betas` is a NumPy array (precise for
    T in the thousands) and in jnp when it is traced (respacing inside a jitted sampler).
    """
    xp = np if isinstance(betas, np.ndarray) else jnp
    betas = xp.asarray(betas, dtype=xp.float64 if xp is np else None)
    alphas = 1.0 - betas
    alphas_cumprod = xp.cumprod(alphas)
    return _schedule(xp, betas, alphas, alphas_cumprod)


def schedule_from_alphas_cumprod(alphas_cumprod) -> Schedule:
    """The schedule whose abar_t equals `alphas_cumprod` (T,): beta_t = 1 - abar_t / abar_{t-1}.

    Used to respace a process to a subset of its timesteps (improved DDPM, Sec. 4).
    """
    xp = np if isinstance(alphas_cumprod, np.ndarray) else jnp
    prev = xp.concatenate([xp.ones_like(alphas_cumprod[:1]), alphas_cumprod[:-1]])
    alphas = alphas_cumprod / prev
    return _schedule(xp, 1.0 - alphas, alphas, alphas_cumprod)


def _schedule(xp, betas, alphas, alphas_cumprod) -> Schedule:
    alphas_cumprod_prev = xp.concatenate([xp.ones_like(alphas_cumprod[:1]), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # beta~_0 = 0, so its log is clipped to beta~_1 as the original code does.
    if posterior_variance.shape[0] > 1:
        clipped = xp.concatenate([posterior_variance[1:2], posterior_variance[1:]])
    else:
        clipped = posterior_variance
    fields = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=xp.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=xp.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=xp.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=xp.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=xp.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=xp.log(xp.maximum(clipped, 1e-20)),
        posterior_mean_coef1=betas * xp.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * xp.sqrt(alphas) / (1.0 - alphas_cumprod),
        snr=alphas_cumprod / (1.0 - alphas_cumprod),
    )
    if xp is np:
        fields = {k: jnp.asarray(v, dtype=jnp.result_type(float)) for k, v in fields.items()}
    return Schedule(**fields)
