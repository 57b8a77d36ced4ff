"""Sampling from a trained network, sharded over the mesh: the piece training's sample grids,
evaluation and `--mode=sample` share.

`make_sample_fn` compiles the reverse process of `config.sampling` once per batch size;
`generate` draws any number of samples with it in batches, with progress in the log;
`write_samples` writes the picture of one batch (PNG grid + .npz).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax import metrics_io, parallel, paths

log = logging.getLogger(__name__)

# Images in the picture of the reverse process: only their x0 predictions are kept.
REVERSE_PROCESS_ROWS = 8


def make_sample_fn(
    model, sched, config, mesh, *, return_x0_at=None, decoder=None, null_context=None
):
    """A jitted fn(params, key, cond, batch_size, x_T=None) -> images (B, H, W, C).

    cond: class labels (B,) int32, or for text-conditioned models a context (B, M, D) (token
    ids (B, L) for a network that encodes them itself); None samples unconditionally. The
    parameters are a traced argument (not constants of the program) and the batch is split
    over every device of the mesh; one compile per batch size. x_T (B, h, w, c), the
    starting noise, is drawn from `key` when not given. `decoder` = (decode_fn,
    decoder_params) turns latents into images (latent diffusion). `null_context` (1, M, D)
    or (1, L) | None is the unconditional context of guidance for text models (zeros when
    None); with `return_x0_at`, fn returns (images, the x0 predictions of the first
    REVERSE_PROCESS_ROWS images at those steps (K, rows, H, W, C)).
    """
    settings = config_lib.sample_settings(config)  # guidance included: used only with labels
    size, channels = config_lib.model_input_shape(config)
    text = config_lib.is_text_conditioned(config)
    decode_fn, decoder_params = decoder if decoder is not None else (None, None)

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
            settings=settings,
            labels=cond,
            return_x0_at=return_x0_at,
            return_x0_rows=REVERSE_PROCESS_ROWS,
        )
        if decode_fn is None:
            return out
        return jax.tree.map(lambda z: decode_fn(decoder_params, z), out)

    jitted = jax.jit(run, static_argnums=(3,))

    def sample_fn(params, key, cond, batch_size, x_T=None):
        return jitted(params, key, cond, batch_size, decoder_params, null_context, x_T)

    return sample_fn


def grid_labels(config, num: int):
    """Labels for a picture: one row per class for conditional models, else None."""
    if not config.model.class_conditional:
        return None
    classes = config.data.num_classes
    per_row = max(num // classes, 1)
    return jnp.asarray(np.arange(num) // per_row % classes, jnp.int32)


def generate(
    sample_fn, config, mesh, params, num: int, key, *, labels=None, progress_every=1, x0_fn=None
):
    """`num` samples as uint8 (num, H, W, C), drawn in batches of sampling.batch_size split
    over all devices (batch i from fold_in(key, i)), with samples/s and ETA in the log.

    labels: (num,) class labels or, for text models, contexts (num, M, D) or token ids
    (num, L); None draws
    random classes for class-conditional models and samples the others unconditionally.
    x0_fn: the sampler with `return_x0_at`; given, the first batch is drawn with it and
    generate returns (images, the first batch's x0 predictions (K, B, H, W, C) in [-1, 1]):
    the reverse process comes from the same pass as the samples."""
    batch = parallel.padded_batch(min(config.sampling.batch_size, num), mesh.size)
    progress = metrics_io.Progress(num, unit="samples")
    out, done, trajectory = [], 0, None
    for i in range(-(-num // batch)):
        batch_labels = None
        if labels is not None:
            batch_labels = jnp.asarray(labels[done : done + batch])
        elif config.model.class_conditional:
            batch_labels = jax.random.randint(
                jax.random.fold_in(key, 10_000 + i), (batch,), 0, config.data.num_classes
            )
        if batch_labels is not None and batch_labels.shape[0] < batch:
            pad = [(0, batch - batch_labels.shape[0])] + [(0, 0)] * (batch_labels.ndim - 1)
            batch_labels = jnp.pad(batch_labels, pad)
        fn = x0_fn if (x0_fn is not None and i == 0) else sample_fn
        images = fn(params, jax.random.fold_in(key, i), batch_labels, batch)
        if fn is x0_fn:
            images, trajectory = images[0], parallel.gather(images[1])
        out.append(metrics_io.to_uint8(parallel.gather(images)))
        done = min(done + batch, num)
        if (i + 1) % progress_every == 0 or done == num:
            log.info("sampling %s", progress.line(done, progress.update(done)))
    images = np.concatenate(out)[:num]
    return images if x0_fn is None else (images, trajectory)


def reverse_process_steps(config, frames: int = 8) -> tuple[int, ...]:
    """`frames` network evaluations spread evenly from the first to the last: the columns
    of the reverse-process picture."""
    steps = config.sampling.num_steps
    return tuple(sorted({round(i * (steps - 1) / (frames - 1)) for i in range(frames)}))


def save_reverse_process(path, trajectory, num_images: int = REVERSE_PROCESS_ROWS) -> None:
    """One row per image, one column per frame: x0 predictions (K, B, H, W, C) as sampling
    goes, of the first `num_images` images."""
    trajectory = np.asarray(trajectory)[:, :num_images]
    grid = np.swapaxes(trajectory, 0, 1).reshape((-1,) + trajectory.shape[2:])
    metrics_io.save_grid(path, grid, rows=trajectory.shape[1])


def write_samples(sample_fn, config, mesh, params, key, path) -> None:
    """One batch of sampling.num_samples samples from `key`: the grid PNG at `path` (a row
    per class for conditional models) and, beside it (.npz), its uint8 images (arr_0) and
    labels."""
    num = config.sampling.num_samples
    batch = parallel.padded_batch(num, mesh.size)
    labels = grid_labels(config, batch)
    images = parallel.gather(sample_fn(params, key, labels, batch))[:num]
    rows = config.data.num_classes if config.model.class_conditional else None
    metrics_io.save_grid(path, images, rows=rows)
    if parallel.is_main_process():
        paths.save_npz(
            paths.path(path).with_suffix(".npz"),
            arr_0=metrics_io.to_uint8(images),
            labels=np.asarray(labels)[:num] if labels is not None else np.zeros(0, np.int32),
        )
