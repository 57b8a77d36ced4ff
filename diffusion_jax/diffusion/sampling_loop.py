"""The sampling driver: `sample` draws x_0 from the reverse process in one jitted `lax.scan`
over the steps of the sampler its `SamplerSettings` name, so a whole run stays on the device.

A denoiser is `model_fn(x_t (B, ...), t (B,) int32, labels (B,) int32 | None)` returning the
network output for `prediction` (eps, x0 or v; twice the channels when the variance is
learned). `labels=None` asks for the unconditional output (the model's null label).

Classifier-free guidance (Ho & Salimans 2022) mixes the two outputs as
    out = out_uncond + w * (out_cond - out_uncond),
so w = 1 is the conditional model, w = 0 the unconditional one and w > 1 strengthens the
condition (some papers write w' = w - 1). Only the mean part of the output is guided; a
learned variance is taken from the conditional output.

`num_steps` counts network evaluations (NFE, guidance's second pass not counted) for every
sampler: one per step, except Heun's two (`SamplerSettings.nfe`). The grid is
`timesteps.sampling_grid`'s; the update formulas live in `ancestral.py` (DDPM, DDIM),
`multistep.py` (lambda = log(alpha / sigma) solvers) and `karras.py` (Euler, Heun).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import process
from diffusion_jax.diffusion.ancestral import step_noise
from diffusion_jax.diffusion.sampler_settings import (
    SAMPLERS,
    SamplerSettings,
    num_grid_steps,
    settings_from,
)
from diffusion_jax.diffusion.schedules import Schedule, schedule_from_alphas_cumprod
from diffusion_jax.diffusion.timesteps import conventions_for, default_spacing, sampling_grid


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
        """The noise of step i, shaped like x (`ancestral.step_noise`)."""
        return step_noise(self.key, i, x.shape, x.dtype)

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


def sample(
    model_fn,
    sched: Schedule,
    key,
    *,
    x_T=None,
    shape=None,
    settings: SamplerSettings | None = None,
    labels=None,
    return_x0_at=None,
    return_x0_rows: int | None = None,
    **options,
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
      settings: the sampler and its options (`SamplerSettings`; default: its defaults, the
        ancestral sampler over all T steps).
      labels: (B,) int class labels (or the model's condition) or None; guided when the
        settings' guidance_scale is not None.
      return_x0_at: indices of network evaluations (0..nfe - 1: the steps, or Heun's two
        evaluations per step in order) whose x0 predictions to also return; the last is the
        output, and an index past it stands for it.
      return_x0_rows: keep those predictions for the first this many images only (the
        scan stacks (nfe, rows, H, W, C) instead of (nfe, B, H, W, C)); None: all.
      **options: fields of `SamplerSettings` (sampler=, num_steps=, eta=, prediction=,
        guidance_scale=, ...), replacing those of `settings`: the keyword form
        `sample(model_fn, sched, key, x_T=x_T, sampler="ddim", num_steps=50)`.

    Returns:
      x_0 (B, H, W, C), or (x_0, x0_predictions (len(return_x0_at), rows, H, W, C)).

    Raises:
      ValueError ('<option>: <text>', `SamplerSettings.check`) for options that cannot work,
      TypeError for an option that is not one.
    """
    settings = settings_from(settings, **options)
    settings.check(sched.num_timesteps)
    s = settings
    sampler = s.sampler
    karras_sigmas = s.uses_karras_sigmas
    solver_order = s.order
    if sampler == "dpm_solver++" and solver_order == 3:
        sampler = "dpm_solver++_3m"
    final_is_data = s.final_sigmas_type == "zero"
    if x_T is None:
        if shape is None:
            raise ValueError("sample() needs x_T or shape")
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, sched.betas.dtype)
    spacing = s.spacing or default_spacing(sampler, s.conventions)
    conv = conventions_for(s.conventions, sampler, spacing)
    evaluations = s.num_steps or SAMPLERS[sampler].default_steps or sched.num_timesteps
    steps = min(num_grid_steps(sampler, evaluations), sched.num_timesteps)
    grid = sampling_grid(
        sched,
        sampler,
        steps,
        spacing=spacing,
        steps_offset=s.steps_offset,
        timesteps=s.timesteps,
        karras_sigmas=karras_sigmas,
        final_alpha_cumprod=1.0 if final_is_data else sched.alphas_cumprod[0],
        conventions=conv,
        sigma_max=s.sigma_max,
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
        s.guidance_scale,
        jnp.asarray(s.eta, sched.betas.dtype),
        sampler=sampler,
        prediction=s.prediction,
        variance=s.variance,
        clip_denoised=s.clip_denoised,
        return_x0_at=return_x0_at,
        return_x0_rows=return_x0_rows,
        options=_Options(
            s.unipc_variant,
            float(s.s_churn),
            float(s.s_tmin),
            float(s.s_tmax),
            float(s.s_noise),
            solver_order,
            bool(s.lower_order_final),
            # DDIM's final level is in its abar' array: both finals share one program.
            final_is_data or sampler == "ddim",
            conv.init_sigma_only,
            conv.clip_keeps_eps and bool(s.clip_denoised),
        ),
    )
