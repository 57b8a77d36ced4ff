"""Samplers of the reverse process: ancestral DDPM, DDIM(eta), the multistep DPM-Solver++
(2M, 2M SDE, 3M) and UniPC, and EDM's Euler and Heun over Karras sigmas.

Every sampler is one `lax.scan` over its steps inside one `jax.jit`, so a whole run stays on
the device. A denoiser is `model_fn(x_t (B, ...), t (B,) int32, labels (B,) int32 | None)`
returning the network output for `prediction` (eps, x0 or v; twice the channels when the
variance is learned). `labels=None` asks for the unconditional output (the model's null label).

Classifier-free guidance (Ho & Salimans 2022) mixes the two outputs as
    out = out_uncond + w * (out_cond - out_uncond),
so w = 1 is the conditional model, w = 0 the unconditional one and w > 1 strengthens the
condition (some papers write w' = w - 1). Only the mean part of the output is guided; a
learned variance is taken from the conditional output.

`num_steps` counts network evaluations (NFE, guidance's second pass not counted) for every
sampler: one per step, except Heun's two (`nfe`). The update formulas live in
`multistep.py` (lambda = log(alpha / sigma) solvers) and `karras.py` (Euler, Heun).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import karras, multistep, process
from diffusion_jax.diffusion.schedules import Schedule, schedule_from_alphas_cumprod

SPACINGS = ("uniform", "quadratic", "trailing")
# The samplers on respaced timesteps; the Karras samplers (euler, heun) take no spacing.
DEFAULT_SPACING = {
    "ddpm": "uniform",
    "ddim": "uniform",
    "dpm_solver++": "trailing",
    "dpm_solver++_sde": "trailing",
    "dpm_solver++_3m": "trailing",
    "unipc": "trailing",
}


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


class _Spec(NamedTuple):
    """How `_sample` runs a sampler."""

    step: Callable  # (ctx, carry, i) -> (carry, x0 (B, ...), or (E, B, ...) for E evaluations)
    init: Callable  # (ctx, x_T) -> carry; carry[0] is the sample, after the last step x_0
    default_steps: int | None  # None: T
    evals_per_step: int = 1


def _zeros_after(count):
    """init of a sampler whose carry is x_T and `count` zero histories."""
    return lambda ctx, x_T: (x_T,) + (jnp.zeros_like(x_T),) * count


SAMPLERS = {
    "ddpm": _Spec(_ddpm_step, _zeros_after(1), None),
    "ddim": _Spec(_ddim_step, _zeros_after(1), 50),
    "dpm_solver++": _Spec(multistep.dpm_solver_pp_2m_step, _zeros_after(1), 20),
    "dpm_solver++_sde": _Spec(multistep.dpm_solver_pp_2m_sde_step, _zeros_after(1), 20),
    "dpm_solver++_3m": _Spec(multistep.dpm_solver_pp_3m_step, _zeros_after(2), 20),
    "unipc": _Spec(multistep.unipc_step, _zeros_after(3), 20),
    "euler": _Spec(karras.euler_step, karras.init, 50),
    # 35 evaluations: EDM's 18 Heun steps on CIFAR-10.
    "heun": _Spec(karras.heun_step, karras.init, 35, evals_per_step=2),
}
KARRAS_SAMPLERS = ("euler", "heun")


def _num_grid_steps(sampler: str, num_steps: int) -> int:
    """Steps that spend at most num_steps evaluations: ceil(N / E) for E evaluations a step
    but one on the last (Heun: floor((N + 1) / 2) steps cost 2K - 1, as in EDM)."""
    return -(-num_steps // SAMPLERS[sampler].evals_per_step)


def nfe(sampler: str, num_steps: int, timesteps=None) -> int:
    """Network evaluations `sample(..., sampler=sampler, num_steps=num_steps)` makes.

    num_steps for every sampler but Heun, which spends 2 floor((N + 1) / 2) - 1 <= N (an
    even budget leaves one unused). Guidance doubles each evaluation (not counted here).
    With explicit `timesteps` of length K: K evaluations, 2K - 1 for Heun.
    """
    if timesteps is not None and len(timesteps):
        per_step = SAMPLERS[sampler].evals_per_step if sampler in SAMPLERS else 1
        return per_step * len(timesteps) - (per_step - 1)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampling.sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
    if num_steps < 1:
        raise ValueError(f"sampling.num_steps must be >= 1, got {num_steps}")
    steps = _num_grid_steps(sampler, num_steps)
    per_step = SAMPLERS[sampler].evals_per_step
    return per_step * steps - (per_step - 1)


class _Options(NamedTuple):
    """The static settings of particular samplers (hashable: part of the jit's cache key)."""

    unipc_variant: str = "bh2"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0


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
        options,
    ):
        self.key = key
        self.timesteps = timesteps
        self.num_steps = timesteps.shape[0]
        self.labels = labels
        self.prediction, self.variance, self.clip_denoised = prediction, variance, clip_denoised
        self.eta = eta
        self.sched = sched
        self.unipc_variant = options.unipc_variant
        self.s_churn, self.s_tmin = options.s_churn, options.s_tmin
        self.s_tmax, self.s_noise = options.s_tmax, options.s_noise
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

    def noise(self, i, x):
        """The noise of step i, shaped like x (`_step_noise`)."""
        return _step_noise(self.key, i, x.shape, x.dtype)

    def x0_eps_at(self, out, x, t):
        """(x0, eps) from the output at timestep t (scalar), x0 clipped (eps recomputed) if
        asked."""
        mean_output, _ = process.split_variance_output(out, self.variance)
        t = jnp.full((x.shape[0],), t, jnp.int32)
        x0, eps = process.x0_eps_from_prediction(self.sched, self.prediction, mean_output, x, t)
        if self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = process.eps_from_x0(self.sched, x, t, x0)
        return x0, eps

    def x0_eps(self, out, x, i):
        """(x0, eps) from the output at step i (`x0_eps_at`)."""
        return self.x0_eps_at(out, x, self.timesteps[i])

    def x0_at(self, x, t):
        """The x0 prediction of the (guided) model at x_t, timestep t (scalar); one NFE."""
        out = self._model(x, jnp.full((x.shape[0],), t, jnp.int32))
        return self.x0_eps_at(out, x, t)[0]

    def x0(self, x, i):
        """The x0 prediction at step i (`x0_at`)."""
        return self.x0_at(x, self.timesteps[i])


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn",
        "sampler",
        "prediction",
        "variance",
        "clip_denoised",
        "return_x0_at",
        "options",
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
    options,
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
        options=options,
    )
    spec = SAMPLERS[sampler]
    step = functools.partial(spec.step, ctx)
    carry, pred_x0 = jax.lax.scan(step, spec.init(ctx, x_T), jnp.arange(ctx.num_steps))
    x = carry[0]
    if return_x0_at is None:
        return x
    if spec.evals_per_step > 1:
        # One prediction per evaluation, in order; the last step makes only the first.
        pred_x0 = pred_x0.reshape((-1,) + pred_x0.shape[2:])
        pred_x0 = pred_x0[: pred_x0.shape[0] - spec.evals_per_step + 1]
    # An index past the last evaluation stands for the last, the output (Heun with an even
    # num_steps makes num_steps - 1 evaluations).
    at = np.minimum(np.asarray(return_x0_at), pred_x0.shape[0] - 1)
    return x, pred_x0[at]


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
    unipc_variant: str = "bh2",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
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
        "ddim" (with `eta`), "dpm_solver++" (2M), "dpm_solver++_sde" (2M SDE),
        "dpm_solver++_3m" (3M), "unipc" (UniPC-2 with its corrector), all data prediction;
        or "euler" / "heun" (EDM, Karras sigmas with rho = 7, `karras.py`).
      num_steps: network evaluations N <= T (`nfe`): N steps, or floor((N + 1) / 2) Heun
        steps; default T for ddpm, 50 for ddim and euler, 35 for heun, 20 for the others.
      spacing: "uniform", "quadratic" or "trailing" (`respaced_timesteps`); default "uniform"
        for ddpm and ddim, "trailing" for the multistep solvers; euler and heun take none
        (their steps are the timesteps nearest the Karras sigmas).
      timesteps: explicit descending int array (K,) overriding num_steps and spacing (for
        euler and heun: the grid of sigmas, K steps, then sigma = 0).
      prediction, variance, clip_denoised: as in `process.p_mean_variance`.
      labels: (B,) int class labels or None; guidance_scale: float w (module doc) or None
        for no guidance.
      return_x0_at: indices of network evaluations (0..nfe - 1: the steps, or Heun's two
        evaluations per step in order) whose x0 predictions to also return; the last is the
        output, and an index past it stands for it.
      unipc_variant: "bh2" (B(h) = e^h - 1, diffusers' default) or "bh1" (B(h) = h).
      s_churn, s_tmin, s_tmax, s_noise: EDM's stochastic churn (Algorithm 2) for euler and
        heun; the defaults (EDM's code) add no noise.

    Returns:
      x_0 (B, H, W, C), or (x_0, x0_predictions (len(return_x0_at), B, H, W, C)).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampling.sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
    if unipc_variant not in multistep.UNIPC_VARIANTS:
        raise ValueError(
            f"unknown unipc_variant {unipc_variant!r}; choose one of {multistep.UNIPC_VARIANTS}"
        )
    karras_grid = sampler in KARRAS_SAMPLERS
    if karras_grid and spacing:
        raise ValueError(
            f"sampling.spacing={spacing!r} does not apply to sampler {sampler!r}, whose steps "
            "follow the Karras sigmas; leave it empty or give sampling.timesteps"
        )
    if x_T is None:
        if shape is None:
            raise ValueError("sample() needs x_T or shape")
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, sched.betas.dtype)
    if timesteps is None:
        evaluations = num_steps or SAMPLERS[sampler].default_steps or sched.num_timesteps
        steps = min(_num_grid_steps(sampler, evaluations), sched.num_timesteps)
        if karras_grid:
            timesteps = karras.karras_timesteps(sched.alphas_cumprod, steps)
        else:
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
        options=_Options(
            unipc_variant, float(s_churn), float(s_tmin), float(s_tmax), float(s_noise)
        ),
    )
