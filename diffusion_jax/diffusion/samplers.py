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

The grid a sampler walks is K timesteps t_i given to the network and the level abar_i of
each (the schedule's abar_{t_i}, or between two timesteps for sigmas off the table), then a
final point abar_K = `final_alpha_cumprod` (1: the data). Published samplers differ in how
they build it; `sample` takes each difference as an argument (spacing, steps_offset,
final_alpha_cumprod, karras_sigmas, solver_order, lower_order_final) and `conventions`
names the rest of diffusers' per-scheduler habits (`Conventions`), so that a pipeline
folder's scheduler_config.json can be followed exactly.
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

SPACINGS = ("uniform", "quadratic", "trailing", "leading", "linspace")
# The samplers on respaced timesteps; the Karras samplers (euler, heun) take a spacing only
# without Karras sigmas.
DEFAULT_SPACING = {
    "ddpm": "uniform",
    "ddim": "uniform",
    "dpm_solver++": "trailing",
    "dpm_solver++_sde": "trailing",
    "dpm_solver++_3m": "trailing",
    "unipc": "trailing",
}
CONVENTION_NAMES = ("project", "diffusers")


class Conventions(NamedTuple):
    """How a sampler builds its grid and its first and last steps where diffusers' schedulers
    do it differently from this module (`conventions_for`); all False/"schedule"/"nearest"
    are this module's own.

    ddim_prev_step_ratio: DDIM steps from t_i to the level of t_i - floor(T / K)
      (DDIMScheduler's prev_timestep), the final point when negative, instead of to t_{i+1}.
      The same for "leading" spacing; for the others the two differ by a timestep or so.
    spacing_includes_end: "leading" and "linspace" space K + 1 points and drop the last
      (t near 0), whose place the final point takes (DPMSolverMultistepScheduler and
      UniPCMultistepScheduler), instead of K points.
    karras_range: the Karras sigmas span sigma_{t=0}..sigma_{t=T-1} ("schedule"; EDM,
      DPMSolverMultistep) or the sigmas of the spaced grid's last and first timesteps
      ("timesteps"; EulerDiscreteScheduler).
    level_timesteps: how a sigma off the table becomes a network timestep: "nearest" (the
      nearest timestep in log sigma, the step then at its table level; EDM's rounding),
      "rounded" (round(t(sigma)), the step at sigma's own level; DPMSolverMultistep) or
      "fractional" (t(sigma) itself, `karras.timestep_of_sigma`; EulerDiscrete). Fractional
      also keeps "linspace" timesteps unrounded, at the sigma interpolated there.
    init_sigma_only: euler/heun start from x_T sigma_0 instead of x_T sqrt(1 + sigma_0^2)
      (EulerDiscreteScheduler's init_noise_sigma with "linspace" or "trailing" spacing).
    clip_keeps_eps: clip_denoised clips x0 and keeps the network's eps (DDIMScheduler's
      clip_sample) instead of recomputing eps from the clipped x0 (improved DDPM).
    """

    ddim_prev_step_ratio: bool = False
    spacing_includes_end: bool = False
    karras_range: str = "schedule"
    level_timesteps: str = "nearest"
    init_sigma_only: bool = False
    clip_keeps_eps: bool = False


PROJECT = Conventions()
# diffusers' scheduler classes behind each sampler, and their default timestep_spacing.
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm_solver++": "DPMSolverMultistepScheduler",
    "dpm_solver++_sde": "DPMSolverMultistepScheduler",
    "dpm_solver++_3m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}
DIFFUSERS_SPACING = {"ddpm": "leading", "ddim": "leading"}  # "linspace" for the others


def conventions_for(name: str, sampler: str, spacing: str | None = None) -> Conventions:
    """The `Conventions` of `sampler` under `name`: "project" (this module's own) or
    "diffusers" (those of the sampler's class in `DIFFUSERS_SCHEDULERS`)."""
    if name not in CONVENTION_NAMES:
        raise ValueError(f"unknown sampling.conventions {name!r}; choose one of {CONVENTION_NAMES}")
    if name == "project" or sampler == "ddpm":
        return PROJECT
    if sampler == "ddim":
        return Conventions(ddim_prev_step_ratio=True, clip_keeps_eps=True)
    if sampler in KARRAS_SAMPLERS:
        return Conventions(
            karras_range="timesteps",
            level_timesteps="fractional",
            init_sigma_only=spacing in ("linspace", "trailing"),
        )
    return Conventions(spacing_includes_end=True, level_timesteps="rounded")


def default_spacing(sampler: str, conventions: str = "project") -> str:
    """The spacing `sample` uses when given none."""
    if conventions == "diffusers":
        return DIFFUSERS_SPACING.get(sampler, "linspace")
    return DEFAULT_SPACING.get(sampler, "uniform")


def respaced_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: str = "uniform",
    *,
    steps_offset: int = 0,
    include_end: bool = False,
    fractional: bool = False,
) -> np.ndarray:
    """K timesteps of a T-step process, descending, int32 (K,) (float32 when `fractional`).

    uniform: round(i (T - 1) / (K - 1)), which keeps both t = 0 and t = T - 1 (improved DDPM);
    quadratic: floor((i sqrt(0.8 T) / (K - 1))^2) (the DDIM paper's CIFAR-10 spacing);
    trailing: round(T - i T / K) - 1, which starts at T - 1 and leaves out t = 0, so the last
    step goes from t = T/K - 1 to the data (diffusers' "trailing"; the stable choice for
    multistep solvers, whose second-order step into t = 0 would extrapolate far);
    leading: j floor(T / P) + steps_offset for j = P - 1 down to P - K (diffusers' "leading",
    Stable Diffusion's: steps_offset=1 and K = 50 give 981, 961, ..., 1);
    linspace: the first K of round(j (T - 1) / (P - 1)), j = P - 1 down to 0 (diffusers'
    "linspace"; unrounded when `fractional`, as EulerDiscreteScheduler keeps them).
    P = K + 1 when `include_end` (the last point, near t = 0, then belongs to the final
    point; see `Conventions.spacing_includes_end`), else K. steps_offset shifts "leading"
    only, as in diffusers.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(
            f"sampling.num_steps must be in [1, {num_timesteps}] (diffusion.num_timesteps), "
            f"got {num_steps}"
        )
    points = num_steps + 1 if include_end else num_steps
    if spacing == "leading":
        steps = np.arange(points - 1, points - 1 - num_steps, -1) * (num_timesteps // points)
        steps = steps + steps_offset
        if steps.max() >= num_timesteps or steps.min() < 0:
            raise ValueError(
                f"sampling.steps_offset={steps_offset} moves the leading timesteps of "
                f"{num_steps} steps outside [0, {num_timesteps})"
            )
        return steps.astype(np.int32)
    if spacing == "linspace":
        steps = np.linspace(0, num_timesteps - 1, points)[::-1][:num_steps]
        return steps.astype(np.float32) if fractional else np.round(steps).astype(np.int32)
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
    """DDIM update (Eq. 12 of Song et al. 2021) from t_i to t_{i+1}; after the last step
    abar' = final_alpha_cumprod (1: x' = x0; DDIMScheduler's set_alpha_to_one=False takes
    abar_0, leaving x' = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps).

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
    solver_order: int = 2
    lower_order_final: bool = False
    final_is_data: bool = True
    init_sigma_only: bool = False
    clip_keeps_eps: bool = False


class _Context:
    """What a sampler step needs, computed once outside the scan: the grid's timesteps (K,),
    its levels abar (K,), DDIM's next levels (K,) and the final level (a scalar)."""

    def __init__(
        self,
        *,
        model_fn,
        sched,
        key,
        grid,
        labels,
        guidance_scale,
        eta,
        prediction,
        variance,
        clip_denoised,
        options,
    ):
        timesteps, abar, abar_next, final = grid
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
        self.solver_order, self.lower_order_final = options.solver_order, options.lower_order_final
        self.final_is_data, self.init_sigma_only = options.final_is_data, options.init_sigma_only
        self.clip_keeps_eps = options.clip_keeps_eps
        self._model = functools.partial(
            guided_model_output,
            model_fn,
            labels=labels,
            guidance_scale=guidance_scale,
            variance=variance,
        )
        end = jnp.reshape(final, (1,)).astype(abar.dtype)
        self.abar = abar
        self.abar_next = abar_next
        # The respaced process over the chosen steps, ascending in time (improved DDPM).
        self.sub = schedule_from_alphas_cumprod(abar[::-1])
        self.alpha = jnp.sqrt(jnp.concatenate([abar, end]))
        self.sigma = jnp.sqrt(jnp.concatenate([1.0 - abar, 1.0 - end]))
        self.lam = jnp.log(self.alpha) - jnp.log(jnp.maximum(self.sigma, 1e-30))
        if self.final_is_data:
            self.lam = self.lam.at[-1].set(jnp.inf)

    def _times(self, t, x):
        return jnp.full((x.shape[0],), t, self.timesteps.dtype)

    def denoise(self, x, i):
        return self._model(x, self._times(self.timesteps[i], x))

    def sub_index(self, i, x):
        return jnp.full((x.shape[0],), self.num_steps - 1 - i, jnp.int32)

    def noise(self, i, x):
        """The noise of step i, shaped like x (`_step_noise`)."""
        return _step_noise(self.key, i, x.shape, x.dtype)

    def x0_eps_level(self, out, x, abar):
        """(x0, eps) from the output at the level abar (scalar), x0 clipped if asked, with
        eps recomputed from it (or kept: `Conventions.clip_keeps_eps`)."""
        mean_output, _ = process.split_variance_output(out, self.variance)
        x0, eps = process.x0_eps_at_level(self.prediction, mean_output, x, abar)
        if self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            if not self.clip_keeps_eps:
                eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
        return x0, eps

    def x0_eps(self, out, x, i):
        """(x0, eps) from the output at step i (`x0_eps_level`)."""
        return self.x0_eps_level(out, x, self.abar[i])

    def x0_at(self, x, t, abar):
        """The x0 prediction of the (guided) model at x_t, network timestep t, level abar
        (scalars); one NFE."""
        out = self._model(x, self._times(t, x))
        return self.x0_eps_level(out, x, abar)[0]

    def x0(self, x, i):
        """The x0 prediction at step i (`x0_at`)."""
        return self.x0_at(x, self.timesteps[i], self.abar[i])


@functools.partial(
    jax.jit,
    static_argnames=(
        "model_fn",
        "sampler",
        "prediction",
        "variance",
        "clip_denoised",
        "return_x0_at",
        "return_x0_rows",
        "options",
    ),
)
def _sample(
    model_fn,
    sched,
    key,
    x_T,
    grid,
    labels,
    guidance_scale,
    eta,
    *,
    sampler,
    prediction,
    variance,
    clip_denoised,
    return_x0_at,
    return_x0_rows,
    options,
):
    ctx = _Context(
        model_fn=model_fn,
        sched=sched,
        key=jax.random.fold_in(key, 1),
        grid=grid,
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

    def body(carry, i):
        carry, pred = step(carry, i)
        if return_x0_at is None:
            return carry, None  # no (steps, B, ...) stack of predictions to keep
        if return_x0_rows is not None:  # the picture's few images, not the whole batch
            rows = min(return_x0_rows, pred.shape[-4])
            pred = jax.lax.slice_in_dim(pred, 0, rows, axis=pred.ndim - 4)
        return carry, pred

    carry, pred_x0 = jax.lax.scan(body, spec.init(ctx, x_T), jnp.arange(ctx.num_steps))
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


def sampling_grid(
    sched: Schedule,
    sampler: str,
    num_steps: int,
    *,
    spacing: str,
    steps_offset: int = 0,
    timesteps=None,
    karras_sigmas: bool = False,
    final_alpha_cumprod: float = 1.0,
    conventions: Conventions = PROJECT,
):
    """The grid of `sample`: (timesteps (K,), abar (K,), DDIM's next levels abar' (K,), final).

    Without Karras sigmas the timesteps are `respaced_timesteps` (or the explicit ones) at
    their table levels abar_{t_i} (sigma interpolated linearly at fractional timesteps,
    `karras.sigma_at_timestep`, abar = 1 / (1 + sigma^2)). With them, K sigmas of Eq. 5 of
    Karras et al. between the range's ends become timesteps as `conventions.level_timesteps`
    says. abar'_i is abar_{i+1}, final_alpha_cumprod after the last step (or DDIMScheduler's
    t - floor(T / K), `Conventions.ddim_prev_step_ratio`). Traceable in the schedule.
    """
    table = sched.alphas_cumprod
    num_timesteps = sched.num_timesteps
    fractional = conventions.level_timesteps == "fractional"
    if timesteps is not None:
        if karras_sigmas:
            raise ValueError("sampling.timesteps: explicit timesteps take no Karras sigmas")
        spaced = np.asarray(timesteps)
    else:
        include_end = conventions.spacing_includes_end and spacing in ("leading", "linspace")
        spaced = respaced_timesteps(
            num_timesteps,
            num_steps,
            spacing,
            steps_offset=steps_offset,
            include_end=include_end,
            fractional=fractional,
        )
    if np.issubdtype(spaced.dtype, np.integer):
        spaced = jnp.asarray(spaced, jnp.int32)
        abar = table[spaced]
    else:
        spaced = jnp.asarray(spaced, jnp.float32)
        abar = 1.0 / (1.0 + karras.sigma_at_timestep(table, spaced) ** 2)
    if karras_sigmas:
        lo = hi = None
        if conventions.karras_range == "timesteps":
            sigmas = jnp.sqrt((1.0 - abar) / abar)
            lo, hi = sigmas[-1], sigmas[0]
        if conventions.level_timesteps == "nearest":
            spaced = karras.karras_timesteps(table, num_steps, sigma_min=lo, sigma_max=hi)
            abar = table[spaced]
        else:
            log_table = karras.log_sigmas(table)
            sigmas = karras.karras_sigmas(
                jnp.exp(log_table[0]) if lo is None else lo,
                jnp.exp(log_table[-1]) if hi is None else hi,
                num_steps,
            )
            spaced = karras.timestep_of_sigma(table, sigmas)
            if conventions.level_timesteps == "rounded":
                spaced = jnp.round(spaced).astype(jnp.int32)
            else:
                spaced = spaced.astype(jnp.float32)
            abar = 1.0 / (1.0 + sigmas**2)
    final = jnp.asarray(final_alpha_cumprod, table.dtype)
    if conventions.ddim_prev_step_ratio and timesteps is None:
        prev = spaced - num_timesteps // spaced.shape[0]
        abar_next = jnp.where(prev >= 0, table[jnp.maximum(prev, 0)], final)
    else:
        abar_next = jnp.concatenate([abar[1:], final[None]])
    return spaced, abar, abar_next, final


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
    return_x0_rows: int | None = None,
    unipc_variant: str = "bh2",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
    karras_sigmas: bool | None = None,
    solver_order: int | None = None,
    lower_order_final: bool = False,
    conventions: str = "project",
):
    """Draws x_0 from the reverse process, one jitted `lax.scan` over the steps.

    Args:
      model_fn: the denoiser (module doc); it is a static argument of the jit, so call
        `sample` inside your own `jax.jit` with the parameters as traced arguments when the
        closure holds large weights. Its timesteps are int32, or float32 on a grid of
        fractional timesteps (`Conventions.level_timesteps`).
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
      spacing: "uniform", "quadratic", "trailing", "leading" or "linspace"
        (`respaced_timesteps`); default `default_spacing`: "uniform" for ddpm and ddim,
        "trailing" for the multistep solvers (diffusers' conventions: "leading" for ddim,
        "linspace" for the others). euler and heun take one only without Karras sigmas.
      timesteps: explicit descending array (K,) overriding num_steps and spacing (for
        euler and heun: the grid of sigmas, K steps, then the final point).
      prediction, variance, clip_denoised: as in `process.p_mean_variance`.
      labels: (B,) int class labels or None; guidance_scale: float w (module doc) or None
        for no guidance.
      return_x0_at: indices of network evaluations (0..nfe - 1: the steps, or Heun's two
        evaluations per step in order) whose x0 predictions to also return; the last is the
        output, and an index past it stands for it.
      return_x0_rows: keep those predictions for the first this many images only (the
        scan stacks (nfe, rows, H, W, C) instead of (nfe, B, H, W, C)); None: all.
      unipc_variant: "bh2" (B(h) = e^h - 1, diffusers' default) or "bh1" (B(h) = h).
      s_churn, s_tmin, s_tmax, s_noise: EDM's stochastic churn (Algorithm 2) for euler and
        heun; the defaults (EDM's code) add no noise.
      steps_offset: added to "leading" timesteps (Stable Diffusion's scheduler: 1).
      final_sigmas_type: where the last step ends, abar_K: "zero" (abar_K = 1, sigma = 0:
        the data; the last step returns the x0 prediction) or "sigma_min" (abar_K = abar_0,
        the level of t = 0, which ddim, the dpm_solver++ family and euler reach with an
        ordinary last step: x_K = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps for ddim, whose
        set_alpha_to_one=True/False in diffusers are these two).
      karras_sigmas: step on Eq. 5 of Karras et al. (rho = 7) instead of a spacing; default
        True for euler and heun under the project's conventions, else False. For euler,
        heun and the dpm_solver++ family.
      solver_order: dpm_solver++'s order: 1 (the DDIM update in lambda), 2 (2M, default) or
        3 (3M); 1 or 2 for dpm_solver++_sde; 3 for dpm_solver++_3m.
      lower_order_final: with fewer than 15 steps, the dpm_solver++ family takes its last
        step at order 1 and the one before at order 2 at most (`multistep.step_order`);
        without it only the final data point (h = inf) lowers the last step's order.
      conventions: "project" or "diffusers": the per-scheduler habits of `Conventions`.

    Returns:
      x_0 (B, H, W, C), or (x_0, x0_predictions (len(return_x0_at), rows, H, W, C)).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampling.sampler {sampler!r}; choose one of {tuple(SAMPLERS)}")
    if unipc_variant not in multistep.UNIPC_VARIANTS:
        raise ValueError(
            f"unknown unipc_variant {unipc_variant!r}; choose one of {multistep.UNIPC_VARIANTS}"
        )
    karras_grid = sampler in KARRAS_SAMPLERS
    if karras_sigmas is None:
        # Explicit timesteps replace the default Karras grid.
        karras_sigmas = karras_grid and conventions == "project" and timesteps is None
    # diffusers' EulerDiscreteScheduler takes the range of its Karras sigmas from the spaced
    # timesteps; here a spacing and Karras sigmas are one choice too many.
    if karras_sigmas and spacing and conventions == "project":
        raise ValueError(
            f"sampling.spacing={spacing!r} does not apply to Karras sigmas (sampler "
            f"{sampler!r}); leave it empty, give sampling.timesteps, or turn "
            "sampling.use_karras_sigmas off"
        )
    if karras_sigmas and not (karras_grid or sampler.startswith("dpm_solver++")):
        raise ValueError(
            f"sampling.use_karras_sigmas: sampler {sampler!r} steps on timesteps; Karras "
            "sigmas are for euler, heun and the dpm_solver++ family"
        )
    solver_order = _solver_order(sampler, solver_order)
    if sampler == "dpm_solver++" and solver_order == 3:
        sampler = "dpm_solver++_3m"
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(
            f"unknown sampling.final_sigmas_type {final_sigmas_type!r}; choose one of "
            f"{FINAL_SIGMAS_TYPES}"
        )
    final_is_data = final_sigmas_type == "zero"
    if not final_is_data and sampler not in FINITE_FINAL:
        raise ValueError(
            f"sampling.final_sigmas_type: sampler {sampler!r} ends at the data; a final level "
            f"below 1 is for {FINITE_FINAL}"
        )
    if x_T is None:
        if shape is None:
            raise ValueError("sample() needs x_T or shape")
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, sched.betas.dtype)
    spacing = spacing or default_spacing(sampler, conventions)
    conv = conventions_for(conventions, sampler, spacing)
    evaluations = num_steps or SAMPLERS[sampler].default_steps or sched.num_timesteps
    steps = min(_num_grid_steps(sampler, evaluations), sched.num_timesteps)
    grid = sampling_grid(
        sched,
        sampler,
        steps,
        spacing=spacing,
        steps_offset=steps_offset,
        timesteps=timesteps,
        karras_sigmas=karras_sigmas,
        final_alpha_cumprod=1.0 if final_is_data else sched.alphas_cumprod[0],
        conventions=conv,
    )
    if return_x0_at is not None:
        return_x0_at = tuple(int(i) for i in return_x0_at)
    return _sample(
        model_fn,
        sched,
        key,
        x_T,
        grid,
        labels,
        guidance_scale,
        jnp.asarray(eta, sched.betas.dtype),
        sampler=sampler,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
        return_x0_at=return_x0_at,
        return_x0_rows=return_x0_rows,
        options=_Options(
            unipc_variant,
            float(s_churn),
            float(s_tmin),
            float(s_tmax),
            float(s_noise),
            solver_order,
            bool(lower_order_final),
            # DDIM's final level is in its abar' array: both finals share one program.
            final_is_data or sampler == "ddim",
            conv.init_sigma_only,
            conv.clip_keeps_eps and bool(clip_denoised),
        ),
    )


FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# Samplers whose last step can end at a level below 1 (final_sigmas_type="sigma_min").
FINITE_FINAL = ("ddim", "dpm_solver++", "dpm_solver++_sde", "dpm_solver++_3m", "euler")
SOLVER_ORDERS = {"dpm_solver++": (1, 2, 3), "dpm_solver++_sde": (1, 2), "dpm_solver++_3m": (3,)}


def _solver_order(sampler: str, solver_order: int | None) -> int:
    """The order of a dpm_solver++ sampler (2, 3 for 3M; 1 for the others, unused there)."""
    allowed = SOLVER_ORDERS.get(sampler)
    if solver_order is None:
        return 2 if sampler == "dpm_solver++" else allowed[-1] if allowed else 1
    if allowed is None or solver_order not in allowed:
        raise ValueError(
            f"sampling.solver_order={solver_order} does not apply to sampler {sampler!r}"
            + (f"; choose one of {allowed}" if allowed else "")
        )
    return solver_order
