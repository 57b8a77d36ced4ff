"""Input pipelines: one function from `config.data` to an iterator of global batches.

A batch is {"image": (B, H, W, C) float32 in [-1, 1], "label": (B,) int32} of global
`jax.Array`s sharded over the mesh; each process builds only its own rows. The iterator
for step s yields the batch of step s whatever happened before, so a resumed run sees
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import jax
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import parallel
from diffusion_jax.data import digits, folder, latents

log = logging.getLogger(__name__)

IN_MEMORY = ("digits", "synthetic", "folder")


def load_in_memory(config, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split of a small data set as arrays in [-1, 1]."""
    d = config.data
    if d.dataset == "digits":
        return digits.load_digits(split, d.image_size)
    if d.dataset == "folder":
        return folder.load_folder(d.data_dir, split, d.image_size, d.channels)
    if d.dataset == "synthetic":
        rng = np.random.default_rng(1 if split == "train" else 2)
        n = 1024
        images = rng.uniform(-1, 1, (n, d.image_size, d.image_size, d.channels))
        return images.astype(np.float32), rng.integers(0, max(d.num_classes, 1), n).astype(np.int32)
    raise ValueError(f"config.data.dataset={d.dataset!r} is not an in-memory data set")


def _epoch_indices(num_examples: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Example index at each position of an endless stream of seeded per-epoch shuffles."""
    epochs = positions // num_examples
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        mask = epochs == epoch
        out[mask] = perm[positions[mask] % num_examples]
    return out


def in_memory_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch: int,
    seed: int,
    start_step: int,
    random_flip: bool,
    process_index: int,
    process_count: int,
    context: np.ndarray | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the global batch of each step from `start_step` on (with the
    examples' text contexts (N, M, D), or their caption tokens (N, M), when given)."""
    per_host = global_batch // process_count
    step = start_step
    while True:
        positions = step * global_batch + process_index * per_host + np.arange(per_host)
        idx = _epoch_indices(len(images), seed, positions)
        batch = images[idx]
        if random_flip:
            flip = np.random.default_rng([seed, step, process_index, 1]).random(per_host) < 0.5
            batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
        out = {"image": batch, "label": labels[idx]}
        if context is not None:
            out["context"] = context[idx]
        yield out
        step += 1


def create_iterator(
    config, mesh, *, split: str, global_batch: int, start_step: int = 0, train: bool = True
) -> Iterator[dict[str, jax.Array]]:
    """Global batches of `split` from step `start_step` on; random flips only when `train`."""
    d = config.data
    seed = config.training.seed
    if config_lib.is_latent(config):
        arrays = latents.load_latents(config, split)
        local = in_memory_batches(
            arrays["image"],
            arrays["label"],
            global_batch=global_batch,
            seed=seed,
            start_step=start_step,
            random_flip=False,  # a flipped latent is not the latent of the flipped image
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            context=arrays.get("context"),
        )
    elif d.dataset in IN_MEMORY:
        images, labels = load_in_memory(config, split)
        local = in_memory_batches(
            images,
            labels,
            global_batch=global_batch,
            seed=seed,
            start_step=start_step,
            random_flip=train and d.random_flip,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    else:
        from diffusion_jax.data import tfds_source

        local = tfds_source.batches(
            config,
            split=split,
            global_batch=global_batch,
            seed=seed,
            start_step=start_step,
            train=train,
        )
    source = f"latents of {d.dataset}" if config_lib.is_latent(config) else d.dataset
    log.info("data: %s/%s from step %d, global batch %d", source, split, start_step, global_batch)
    return (parallel.to_global(b, mesh) for b in local)
