"""The embedded default data set: scikit-learn's 1,797 handwritten digits (8x8, 17 grey
levels, with labels), ships inside scikit-learn, so nothing is downloaded."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

NUM_CLASSES = 10
HELD_OUT = 297  # examples kept out of training: the "test" split
SPLIT_SEED = 0


@functools.lru_cache(maxsize=8)
def load_digits(split: str, image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S, 1) float32 in [-1, 1], labels (N,) int32) of "train" or "test".

    The 8x8 originals (values 0..16) are upsampled to S x S with bicubic interpolation, which
    reads as handwriting rather than blocks; the split is a fixed permutation.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in ("train", "test"):
        raise ValueError(
            f"config.data.train_split/eval_split: digits has 'train' and 'test', not {split!r}"
        )
    data = sklearn_digits()
    images = data.images.astype(np.float32) / 16.0
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    idx = order[HELD_OUT:] if split == "train" else order[:HELD_OUT]
    resized = np.stack(
        [
            np.asarray(Image.fromarray(img).resize((image_size, image_size), Image.BICUBIC))
            for img in images[idx]
        ]
    )
    resized = np.clip(resized, 0.0, 1.0) * 2.0 - 1.0
    return resized[..., None].astype(np.float32), data.target[idx].astype(np.int32)
