"""Sampling from a trained model, sharded over the mesh: the piece train, sample and eval share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax import parallel


def schedule_from_config(config) -> dm.Schedule:
    f = config.diffusion
    return dm.make_schedule(
        f.schedule,
        f.num_timesteps,
        beta_start=f.beta_start if f.beta_start >= 0 else None,
        beta_end=f.beta_end if f.beta_end >= 0 else None,
    )


def make_sample_fn(model, sched, config, mesh, *, return_x0_at=None, decoder=None):
    """A jitted fn(params, key, cond, batch_size, x_T=None) -> images (B, H, W, C).

    cond: class labels (B,) int32, or for text-conditioned models a context (B, M, D); None
    samples unconditionally. The parameters are a traced argument (not constants of the
    program) and the batch is split over every device of the mesh; one compile per batch
    size. x_T (B, h, w, c), the starting noise, is drawn from `key` when not given.
    `decoder` = (decode_fn, decoder_params) turns latents into images (latent diffusion),
    and `fn.null_context` (B', M, D) | None is the unconditional context of guidance for
    text models (zeros when None).
    """
    s = config.sampling
    guidance = s.guidance_scale if s.guidance_scale >= 0 else None
    size, channels = config_lib.model_input_shape(config)
    text = config_lib.is_text_conditioned(config)
    decode_fn, decoder_params = decoder if decoder is not None else (None, None)

    timesteps = np.asarray(s.timesteps, np.int32) if len(s.timesteps) else None

    def run(params, key, cond, batch_size, decoder_params, null_context, x_T):
        def model_fn(x, t, y):
            if not text:
                return model.apply({"params": params}, x, t, y, train=False)
            context = y if y is not None else null_context
            if context is not None and context.shape[0] != x.shape[0]:
                context = jnp.broadcast_to(context, (x.shape[0],) + context.shape[1:])
            return model.apply({"params": params}, x, t, None, train=False, context=context)

        if x_T is None:
            shape = (batch_size, size, size, channels)
            x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, parallel.batch_sharding(mesh))
        out = dm.sample(
            model_fn,
            sched,
            key,
            x_T=x_T,
            sampler=s.sampler,
            num_steps=s.num_steps,
            spacing=s.spacing or None,
            timesteps=timesteps,
            eta=s.eta,
            prediction=config.diffusion.prediction,
            variance=config.diffusion.variance,
            clip_denoised=s.clip_denoised,
            labels=cond,
            guidance_scale=guidance if cond is not None else None,
            return_x0_at=return_x0_at,
        )
        if decode_fn is None:
            return out
        return jax.tree.map(lambda z: decode_fn(decoder_params, z), out)

    jitted = jax.jit(run, static_argnums=(3,))

    def sample_fn(params, key, cond, batch_size, x_T=None):
        return jitted(params, key, cond, batch_size, decoder_params, sample_fn.null_context, x_T)

    sample_fn.null_context = None
    return sample_fn


def grid_labels(config, num: int):
    """Labels for a picture: one row per class for conditional models, else None."""
    if not config.model.class_conditional:
        return None
    classes = config.data.num_classes
    per_row = max(num // classes, 1)
    return jnp.asarray(np.arange(num) // per_row % classes, jnp.int32)


def padded_batch(num: int, num_devices: int) -> int:
    """The smallest batch >= num that splits evenly over the devices."""
    return -(-num // num_devices) * num_devices


def gather(x) -> np.ndarray:
    """A global array as one host NumPy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
