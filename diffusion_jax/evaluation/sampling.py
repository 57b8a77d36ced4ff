"""Sampling from a trained model, sharded over the mesh: the piece train, sample and eval share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


def make_sample_fn(model, sched, config, mesh, *, return_x0_at=None):
    """A jitted fn(params, key, labels (B,) | None, batch_size) -> images (B, H, W, C).

    The parameters are a traced argument (not constants of the program) and the batch is
    split over every device of the mesh; one compile per batch size.
    """
    s, d = config.sampling, config.data
    guidance = s.guidance_scale if s.guidance_scale >= 0 else None

    def run(params, key, labels, batch_size):
        def model_fn(x, t, y):
            return model.apply({"params": params}, x, t, y, train=False)

        shape = (batch_size, d.image_size, d.image_size, d.channels)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, parallel.batch_sharding(mesh))
        return dm.sample(
            model_fn,
            sched,
            key,
            x_T=x_T,
            sampler=s.sampler,
            num_steps=s.num_steps,
            spacing=s.spacing or None,
            eta=s.eta,
            prediction=config.diffusion.prediction,
            variance=config.diffusion.variance,
            clip_denoised=s.clip_denoised,
            labels=labels,
            guidance_scale=guidance if labels is not None else None,
            return_x0_at=return_x0_at,
        )

    return jax.jit(run, static_argnums=(3,))


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
