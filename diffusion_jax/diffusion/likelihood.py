"""Negative log-likelihood bound in bits per dimension."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import losses, process
from diffusion_jax.diffusion.schedules import Schedule


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction", "variance", "clip_denoised"))
def _bits_per_dim(model_fn, sched, x0, key, labels, *, prediction, variance, clip_denoised):
    batch = x0.shape[0]

    def term(_, t_scalar):
        t = jnp.full((batch,), t_scalar, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = process.q_sample(sched, x0, t, noise)
        out = process.p_mean_variance(
            sched,
            model_fn(x_t, t, labels),
            x_t,
            t,
            prediction=prediction,
            variance=variance,
            clip_denoised=clip_denoised,
        )
        vb = losses.vlb_term_bpd(sched, x0, x_t, t, out["mean"], out["log_variance"])
        return None, vb

    # A scan, so memory stays that of one term whatever T is.
    _, terms = jax.lax.scan(term, None, jnp.arange(sched.num_timesteps))
    terms_bpd = terms.T  # (B, T), terms_bpd[:, 0] is the decoder NLL
    prior = losses.prior_bpd(sched, x0)
    return {"bpd": prior + terms_bpd.sum(axis=1), "prior_bpd": prior, "terms_bpd": terms_bpd}


def bits_per_dim(
    model_fn,
    sched: Schedule,
    x0,
    key,
    *,
    prediction: str = "eps",
    variance: str = "fixed_large",
    clip_denoised: bool = True,
    labels=None,
):
    """The variational bound on -log p(x_0) in bits per dimension (Eq. 5 of Ho et al.).

    L = L_T + sum_{t>=1} L_{t-1} + L_0: the prior KL, the KL terms between q(x_{t-1}|x_t,x_0)
    and p(x_{t-1}|x_t), and the discretized decoder NLL, each at one x_t ~ q(x_t|x_0) drawn
    with fold_in(key, t). x0: (B, H, W, C) in [-1, 1], on the 256-level grid.

    Returns:
      dict with "bpd" (B,), "prior_bpd" (B,) and "terms_bpd" (B, T) where column 0 is L_0.
    """
    return _bits_per_dim(
        model_fn,
        sched,
        x0,
        key,
        labels,
        prediction=prediction,
        variance=variance,
        clip_denoised=clip_denoised,
    )
