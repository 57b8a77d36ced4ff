"""Data sets in their real on-disk formats, made from random bytes: the offline stand-ins that
tests and benchmarks push through the real tfds builders."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np

CIFAR10_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def write_cifar10_binary(root, train_per_file: int, test_size: int, seed: int = 0) -> Path:
    """Writes cifar-10-batches-bin/ (5 training files, a test file and the label names) in
    the CIFAR binary format: per record one label byte and 3072 bytes of R, G, B planes."""
    src = Path(root) / "cifar-10-batches-bin"
    src.mkdir(parents=True, exist_ok=True)
    (src / "batches.meta.txt").write_text("\n".join(CIFAR10_NAMES) + "\n")
    rng = np.random.default_rng(seed)
    files = [(f"data_batch_{i}.bin", train_per_file) for i in range(1, 6)]
    for name, n in files + [("test_batch.bin", test_size)]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        planes = rng.integers(0, 256, (n, 3 * 32 * 32)).astype(np.uint8)
        (src / name).write_bytes(np.concatenate([labels[:, None], planes], axis=1).tobytes())
    return Path(root)


def prepare_fake_cifar10(workdir, train_per_file: int = 8, test_size: int = 12) -> str:
    """Runs the real tfds cifar10 builder on fake files (its download pointed at them);
    returns the data_dir that `tfds.load("cifar10", data_dir=..., download=False)` reads."""
    import tensorflow_datasets as tfds

    extracted = write_cifar10_binary(Path(workdir) / "extracted", train_per_file, test_size)
    data_dir = Path(workdir) / "tfds"
    with mock.patch.object(
        tfds.download.DownloadManager, "download_and_extract", lambda self, url: str(extracted)
    ):
        tfds.builder("cifar10", data_dir=str(data_dir)).download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return str(data_dir)
