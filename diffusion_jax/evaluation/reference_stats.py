"""Reference statistics for FID: mu and sigma of the FID Inception's pool3 features (and the
features themselves, for precision/recall) of a tfds split or a folder of images.

The command-line program is `python -m diffusion_jax.tools.reference_stats`. Images go
through the same uint8 quantisation as generated samples; a tfds split is read in full (no
flips), a folder's PNG/JPEG files in sorted order.
"""

from __future__ import annotations

import logging

import numpy as np

from diffusion_jax import metrics_io, parallel
from diffusion_jax.data import folder
from diffusion_jax.evaluation import inception, metrics

log = logging.getLogger(__name__)


def folder_images(path, image_size: int, channels: int, max_images: int) -> np.ndarray:
    """uint8 (N, S, S, channels), S = image_size: the first `max_images` PNG/JPEG files of
    the folder in sorted order, center-cropped and resized as the training data."""
    files, _ = folder.list_images(path)
    return np.stack([folder.load_image(f, image_size, channels) for f in files[:max_images]])


def split_images(config, split: str, max_images: int) -> np.ndarray:
    """uint8 (N, S, S, C), N <= max_images: the tfds `split` of config.data, in order and
    without flips, quantised as generated samples are."""
    from diffusion_jax.data import tfds_source

    batches = tfds_source.batches(
        config, split=split, global_batch=500, seed=0, start_step=0, train=False
    )
    out, count = [], 0
    for batch in batches:
        out.append(metrics_io.to_uint8(batch["image"]))
        count += len(batch["image"])
        if count >= max_images:
            break
    return np.concatenate(out)[:max_images]


def compute(config, images_uint8: np.ndarray, out) -> None:
    """Writes `out` (.npz): mu (2048,), sigma (2048, 2048) of the FID Inception's pool3
    features of images_uint8 (N, H, W, C), and the first 10,000 features (for precision and
    recall). The Inception weights are config.eval.inception_weights."""
    params = inception.load_params(config.eval.inception_weights)
    mesh = parallel.make_mesh(config)
    feats = inception.fid_features(params, images_uint8, mesh=mesh)
    mu, sigma = metrics.statistics(feats)
    metrics.save_stats(out, mu, sigma, features=feats[:10_000])
    log.info("wrote %s from %d images", out, len(images_uint8))


if __name__ == "__main__":  # the program moved; say where instead of doing nothing
    raise SystemExit("moved: python -m diffusion_jax.tools.reference_stats")
