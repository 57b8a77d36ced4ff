"""Samplers of the reverse process: ancestral DDPM, DDIM(eta) and DPM-Solver++(2M).

Every sampler is one `lax.scan` over its steps inside one `jax.jit`, so a whole run stays on
the device. A denoiser is `model_fn(x_t (B, ...), t (B,) int32, labels (B,) int32 | None)`
returning the network output for `prediction` (eps, x0 or v; twice the channels when the
variance is learned). `labels=None` asks for the unconditional output (the model's null label).

Classifier-free guidance (Ho & Salimans 2022) mixes the two outputs as
    out = out_uncond + w * (out_cond - out_uncond),
so w = 1 is the conditional model, w = 0 the unconditional one and w > 1 strengthens the
condition (some papers write w' = w - 1). Only the mean part of the output is guided; a
learned variance is taken from the conditional output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import process
from diffusion_jax.diffusion.schedules import Schedule, schedule_from_alphas_cumprod

SPACINGS = ("uniform", "quadratic", "trailing")
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm_solver++": "trailing"}


def respaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
    """K timesteps of a T-step process, descending, int32 (K,).

    uniform: round(i (T - 1) / (K - 1)), which keeps both t = 0 and t = T - 1 (improved DDPM);
    quadratic: floor((i sqrt(0.8 T) / (K - 1))^2) (the DDIM paper's CIFAR-10 spacing);
    trailing: round(T - i T / K) - 1, which starts at T - 1 and leaves out t = 0, so the last
    step goes from t = T/K - 1 to the data (diffusers' "trailing"; the stable choice for
    multistep solvers, whose second-order step into t = 0 would extrapolate far).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sampling.num_steps must be in [1, {num_timesteps}] (diffusion.num_timesteps), "
            f"got {num_steps}"
        )
    if num_steps == 1:
        steps = np.array([num_timesteps - 1])
    elif spacing == "uniform":
        steps = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int64)
    elif spacing == "trailing":
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64)
        return (steps - 1).astype(np.int32)
    elif spacing == "quadratic":
        steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
        steps = np.unique(np.minimum(steps, num_timesteps - 1))
        if len(steps) != num_steps:
            raise ValueError(f"quadratic spacing of {num_steps} steps repeats timesteps; use fewer")
    else:
        raise ValueError(f"unknown sampling.spacing {spacing!r}; choose one of {SPACINGS}")
    return steps[::-1].astype(np.int32)


def guided_model_output(model_fn, x, t, labels, guidance_scale, variance):
    """The model output with classifier-free guidance applied to its mean part (module doc)."""
    cond = model_fn(x, t, labels)
    if guidance_scale is None or labels is None:
        return cond
    uncond = model_fn(x, t, None)
    cond_mean, cond_var = process.split_variance_output(cond, variance)
    uncond_mean, _ = process.split_variance_output(uncond, variance)
    guided = uncond_mean + guidance_scale * (cond_mean - uncond_mean)
    return guided if cond_var is None else jnp.concatenate([guided, cond_var], axis=-1)


def _step_noise(key, i, shape, dtype):
    """The noise of step i: the same for every sampler given the same key."""
    return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def _ddpm_step(ctx, carry, i):
    """Ancestral step (Algorithm 2 of Ho et al.) on the respaced schedule ctx.sub."""
    x, _ = carry
    out = ctx.denoise(x, i)
    moments = process.p_mean_variance(
        ctx.sub,
        out,
        x,
        ctx.sub_index(i, x),
        prediction=ctx.prediction,
        variance=ctx.variance,
        clip_denoised=ctx.clip_denoised,
    )
    noise = _step_noise(ctx.key, i, x.shape, x.dtype)
    not_last = (i < ctx.num_steps - 1).astype(x.dtype)
    x = moments["mean"] + not_last * jnp.exp(0.5 * moments["log_variance"]) * noise
    return (x, moments["pred_x0"]), moments["pred_x0"]


def _ddim_step(ctx, carry, i):
    """DDIM update (Eq. 12 of Song et al. 2021) from t_i to t_{i+1} (abar = 1 after the last).

    x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar').
    """
    x, _ = carry
    out = ctx.denoise(x, i)
    x0, eps = ctx.x0_eps(out, x, i)
    abar, abar_next = ctx.abar[i], ctx.abar_next[i]
    sigma = ctx.eta * jnp.sqrt((1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next))
    noise = _step_noise(ctx.key, i, x.shape, x.dtype)
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_next - sigma**2, 0.0))
    x = jnp.sqrt(abar_next) * x0 + direction * eps + sigma * noise
    return (x, x0), x0


def _dpm_solver_pp_step(ctx, carry, i):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in lambda = log(alpha / sigma).

    x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D,  D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},
    h = lambda' - lambda, r = h_{i-1} / h; the first step is first order (D = x0_i) and the
    last one returns x0 (the step to abar = 1 has h = infinity).
    """
    x, x0_prev = carry
    out = ctx.denoise(x, i)
    x0, _ = ctx.x0_eps(out, x, i)
    lam = ctx.lam
    h = lam[i + 1] - lam[i]
    h_prev = lam[i] - lam[jnp.maximum(i - 1, 0)]
    second_order = (i > 0) & (i < ctx.num_steps - 1)
    r = jnp.where(second_order, h_prev / jnp.where(second_order, h, 1.0), 1.0)
    d = jnp.where(second_order, (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
    alpha_next, sigma_next = ctx.alpha[i + 1], ctx.sigma[i + 1]
    x_next = (sigma_next / ctx.sigma[i]) * x - alpha_next * jnp.expm1(-h) * d
    x = jnp.where(i < ctx.num_steps - 1, x_next, x0)
    return (x, x0), x0


SAMPLERS = {"ddpm": _ddpm_step, "ddim": _ddim_step, "dpm_solver++": _dpm_solver_pp_step}


class _Context:
    """What a sampler step needs, computed once outside the scan."""

    def __init__(
        self,
        *,
        model_fn,
        sched,
        key,
        timesteps,
        labels,
        guidance_scale,
        eta,
        prediction,
        variance,
        clip_denoised,
    ):
        self.key = key
        self.timesteps = timesteps
        self.num_steps = timesteps.shape[0]
        self.labels = labels
        self.prediction, self.variance, self.clip_denoised = prediction, variance, clip_denoised
        self.eta = eta
        self.sched = sched
        self._model = functools.partial(
            guided_model_output,
            model_fn,
            labels=labels,
            guidance_scale=guidance_scale,
            variance=variance,
        )
        abar = sched.alphas_cumprod[timesteps]
        one = jnp.ones((1,), abar.dtype)
        self.abar = abar
        self.abar_next = jnp.concatenate([abar[1:], one])
        # The respaced process over the chosen steps, ascending in time (improved DDPM).
        self.sub = schedule_from_alphas_cumprod(abar[::-1])
        self.alpha = jnp.sqrt(jnp.concatenate([abar, one]))
        self.sigma = jnp.sqrt(jnp.concatenate([1.0 - abar, 1.0 - one]))
        self.lam = jnp.log(self.alpha) - jnp.log(jnp.maximum(self.sigma, 1e-30))
        self.lam = self.lam.at[-1].set(jnp.inf)

    def denoise(self, x, i):
        t = jnp.full((x.shape[0],), self.timesteps[i], jnp.int32)
        return self._model(x, t)

    def sub_index(self, i, x):
        return jnp.full((x.shape[0],), self.num_steps - 1 - i, jnp.int32)

    def x0_eps(self, out, x, i):
        """(x0, eps) from the output at step i, x0 clipped (eps recomputed) if asked."""
        mean_output, _ = process.split_variance_output(out, self.variance)
        t = jnp.full((x.shape[0],), self.timesteps[i], jnp.int32)
        x0, eps = process.x0_eps_from_prediction(self.sched, self.prediction, mean_output, x, t)
        if self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = process.eps_from_x0(self.sched, x, t, x0)
        return x0, eps


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn",
        "sampler",
        "prediction",
        "variance",
        "clip_denoised",
        "return_x0_at",
    ),
)
def _sample(
    model_fn,
    sched,
    key,
    x_T,
    timesteps,
    labels,
    guidance_scale,
    eta,
    *,
    sampler,
    prediction,
    variance,
    clip_denoised,
    return_x0_at,
):
    ctx = _Context(
        model_fn=model_fn,
        sched=sched,
        key=jax.random.fold_in(key, 1),
        timesteps=timesteps,
        labels=labels,
        guidance_scale=guidance_scale,
        eta=eta,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
    )
    step = functools.partial(SAMPLERS[sampler], ctx)
    (x, _), pred_x0 = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), jnp.arange(ctx.num_steps))
    if return_x0_at is None:
        return x
    return x, pred_x0[np.asarray(return_x0_at)]


def sample(
    model_fn,
    sched: Schedule,
    key,
    *,
    x_T=None,
    shape=None,
    sampler: str = "ddpm",
    num_steps: int | None = None,
    spacing: str | None = None,
    eta: float = 0.0,
    timesteps=None,
    prediction: str = "eps",
    variance: str = "fixed_large",
    clip_denoised: bool = True,
    labels=None,
    guidance_scale=None,
    return_x0_at=None,
):
    """Draws x_0 from the reverse process, one jitted `lax.scan` over the steps.

    Args:
      model_fn: the denoiser (module doc); it is a static argument of the jit, so call
        `sample` inside your own `jax.jit` with the parameters as traced arguments when the
        closure holds large weights.
      sched: the training `Schedule` (T steps).
      key: PRNG key; x_T (if not given) and the noise of step i both derive from it, the
        latter as fold_in(key', i), so samplers given one key share their noise.
      x_T: (B, H, W, C) starting noise, or `shape` to draw it.
      sampler: "ddpm" (ancestral, Algorithm 2 of Ho et al., respaced betas when K < T),
        "ddim" (with `eta`), or "dpm_solver++" (2M, data prediction).
      num_steps: K <= T steps; default T for ddpm, 50 for ddim, 20 for dpm_solver++.
      spacing: "uniform", "quadratic" or "trailing" (`respaced_timesteps`); default "uniform"
        for ddpm and ddim, "trailing" for dpm_solver++.
      timesteps: explicit descending int array (K,) overriding num_steps and spacing.
      prediction, variance, clip_denoised: as in `process.p_mean_variance`.
      labels: (B,) int class labels or None; guidance_scale: float w (module doc) or None
        for no guidance.
      return_x0_at: step indices (into 0..K-1) whose x0 predictions to also return.

    Returns:
      x_0 (B, H, W, C), or (x_0, x0_predictions (len(return_x0_at), B, H, W, C)).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampling.sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
    if x_T is None:
        if shape is None:
            raise ValueError("sample() needs x_T or shape")
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, sched.betas.dtype)
    if timesteps is None:
        default_steps = {"ddpm": sched.num_timesteps, "ddim": 50, "dpm_solver++": 20}[sampler]
        steps = min(num_steps or default_steps, sched.num_timesteps)
        spacing = spacing or DEFAULT_SPACING[sampler]
        timesteps = respaced_timesteps(sched.num_timesteps, steps, spacing)
    timesteps = jnp.asarray(timesteps, jnp.int32)
    if return_x0_at is not None:
        return_x0_at = tuple(int(i) for i in return_x0_at)
    return _sample(
        model_fn,
        sched,
        key,
        x_T,
        timesteps,
        labels,
        guidance_scale,
        jnp.asarray(eta, sched.betas.dtype),
        sampler=sampler,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
        return_x0_at=return_x0_at,
    )
