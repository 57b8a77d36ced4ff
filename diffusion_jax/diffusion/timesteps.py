"""The grids samplers walk: K network timesteps t_i, the level abar_i of each (the schedule's
abar_{t_i}, or between two timesteps for sigmas off the table), then a final point
abar_K (1: the data).

Published samplers differ in how they build it; `sampling_grid` takes each difference as an
argument (spacing, steps_offset, the final level, Karras sigmas) and `Conventions` names the
rest of diffusers' per-scheduler habits, so that a pipeline folder's scheduler_config.json can
be followed exactly. `respaced_timesteps` are the spacings.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import karras
from diffusion_jax.diffusion.schedules import Schedule

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
# The samplers of EDM, whose grid is Karras sigmas by default (`karras.py`).
KARRAS_SAMPLERS = ("euler", "heun")


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
    karras_sigma_max: the top of a "schedule" Karras range, when the schedule's own sigma
      at t = T - 1 is above it: EDM's 80 for this module, since a VP schedule ends far
      higher (cosine at T = 1000: thousands) and a few Karras steps spent up there leave
      saturated noise; None (diffusers' schedulers) keeps the schedule's sigma.
    """

    ddim_prev_step_ratio: bool = False
    spacing_includes_end: bool = False
    karras_range: str = "schedule"
    level_timesteps: str = "nearest"
    init_sigma_only: bool = False
    clip_keeps_eps: bool = False
    karras_sigma_max: float | None = None


PROJECT = Conventions(karras_sigma_max=80.0)  # EDM's sigma_max
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
    """The spacing `dm.sample` uses when given none."""
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
    sigma_max: float | None = None,
):
    """The grid of `dm.sample`: (timesteps (K,), abar (K,), DDIM's next levels abar' (K,), final).

    Without Karras sigmas the timesteps are `respaced_timesteps` (or the explicit ones) at
    their table levels abar_{t_i} (sigma interpolated linearly at fractional timesteps,
    `karras.sigma_at_timestep`, abar = 1 / (1 + sigma^2)). With them, K sigmas of Eq. 5 of
    Karras et al. between the range's ends become timesteps as `conventions.level_timesteps`
    says, the range's top lowered to `sigma_max` when given. abar'_i is abar_{i+1},
    final_alpha_cumprod after the last step (or DDIMScheduler's t - floor(T / K),
    `Conventions.ddim_prev_step_ratio`). Traceable in the schedule.
    """
    table = sched.alphas_cumprod
    num_timesteps = sched.num_timesteps
    fractional = conventions.level_timesteps == "fractional"
    if timesteps is not None:  # with no Karras sigmas (`SamplerSettings.check`)
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
        elif conventions.karras_sigma_max is not None:
            top = jnp.sqrt((1.0 - table[-1]) / table[-1])
            hi = jnp.minimum(top, conventions.karras_sigma_max)
        if sigma_max is not None:
            top = jnp.sqrt((1.0 - table[-1]) / table[-1]) if hi is None else hi
            hi = jnp.minimum(top, sigma_max)
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
