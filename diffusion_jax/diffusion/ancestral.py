"""The steps of the ancestral DDPM sampler and of DDIM(eta) on a respaced grid.

A step function is `step(ctx, carry, i) -> (carry, x0_i)` with carry = (x, the last x0);
ctx is the sampler context of `sampling_loop.py` (the respaced schedule `sub`, the grid's
levels abar and DDIM's next levels abar_next (K,), eta, `denoise`, `x0_eps`, the key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import process


def step_noise(key, i, shape, dtype):
    """The noise of step i: the same for every sampler given the same key."""
    return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def ddpm_step(ctx, carry, i):
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
    noise = step_noise(ctx.key, i, x.shape, x.dtype)
    not_last = (i < ctx.num_steps - 1).astype(x.dtype)
    x = moments["mean"] + not_last * jnp.exp(0.5 * moments["log_variance"]) * noise
    return (x, moments["pred_x0"]), moments["pred_x0"]


def ddim_step(ctx, carry, i):
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
    noise = step_noise(ctx.key, i, x.shape, x.dtype)
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_next - sigma**2, 0.0))
    x = jnp.sqrt(abar_next) * x0 + direction * eps + sigma * noise
    return (x, x0), x0
