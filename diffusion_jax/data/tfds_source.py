"""tensorflow-datasets input: per-process split, preprocessing as the recipes published it.

Offline by default: a data set that is not prepared fails at once with the command that
prepares it, unless `data.download=True`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import jax
import numpy as np

from diffusion_jax.errors import first_line

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def _native_stderr_silenced():
    """Silences what native code writes to stderr: TensorFlow's C++ start-up lines
    ("oneDNN custom operations are on", "All log messages before absl::InitializeLog()")
    ignore TF_CPP_MIN_LOG_LEVEL. Python exceptions are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.cache
def _tf():
    """TensorFlow, hidden from the accelerators JAX uses. Cached: the visible devices can be
    set only before TensorFlow initialises, so only the first call may set them."""
    with _native_stderr_silenced():
        import tensorflow as tf
        import tensorflow_datasets  # noqa: F401 - imported here for the same silence

    for kind in ("GPU", "TPU"):
        if tf.config.list_physical_devices(kind):
            tf.config.set_visible_devices([], kind)
    return tf


def prepare_command(name: str, data_dir: str) -> str:
    target = f" --data_dir={data_dir}" if data_dir else ""
    return f"tfds build {name}{target}"


def not_prepared_error(name: str, data_dir: str) -> FileNotFoundError:
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    return FileNotFoundError(
        f"config.data.dataset: {name!r} is not prepared in data_dir={where!r}; prepare it with "
        f"`{prepare_command(name, data_dir)}` or set --config.data.download=True"
    )


def check_prepared(name: str, data_dir: str) -> None:
    """Raises `not_prepared_error` unless tfds finds the prepared files of `name` (and a
    ConfigError-style FileNotFoundError for a name tfds does not know)."""
    _tf()
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - tfds's DatasetNotFoundError and friends
        raise FileNotFoundError(
            f"config.data.dataset: {name!r} is not a tfds data set, 'digits', 'folder' or "
            f"'synthetic' ({first_line(e, limit=120)})"
        ) from e
    if not builder.is_prepared():
        raise not_prepared_error(name, data_dir)


def preprocess(
    image, image_size: int, channels: int, random_flip: bool, seed, dequantize: bool = False
):
    """uint8 (h, w, c) -> float32 (S, S, channels) in [-1, 1]: a central square crop, an
    antialiased area resize to S (as the 256x256 recipes), an optional random flip, and
    optional uniform dequantization x -> (x + u) / 128 - 1, u ~ U[0, 1) (likelihood training)."""
    tf = _tf()
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    image = image[top : top + side, left : left + side]
    image = tf.cast(image, tf.float32)
    if image.shape[-1] != channels:
        image = (
            tf.image.grayscale_to_rgb(image) if channels == 3 else tf.image.rgb_to_grayscale(image)
        )
    image = tf.image.resize(image, (image_size, image_size), method="area", antialias=True)
    if random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed)
    if dequantize:
        noise = tf.random.stateless_uniform(tf.shape(image), seed + tf.constant([0, 1], seed.dtype))
        return (image + noise) / 128.0 - 1.0
    return image / 127.5 - 1.0


def batches(
    config, *, split: str, global_batch: int, seed: int, start_step: int, train: bool
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each global batch, from `start_step` on.

    Each process reads its own even part of the split (`tfds.split_for_jax_process`); the
    order is a seeded shuffle, so the stream is deterministic and resuming at step s skips
    s batches of the same stream.
    """
    tf = _tf()
    import tensorflow_datasets as tfds

    d = config.data
    per_host = global_batch // jax.process_count()
    read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16)
    try:
        ds = tfds.load(
            d.dataset,
            split=tfds.split_for_jax_process(split, drop_remainder=True),
            data_dir=d.data_dir or None,
            download=bool(d.download),
            shuffle_files=train,
            read_config=read_config,
        )
    except AssertionError as e:  # tfds's way of saying the files are not there
        if "could not find data" not in str(e):
            raise
        raise not_prepared_error(d.dataset, d.data_dir) from None
    has_label = "label" in ds.element_spec
    flip = train and d.random_flip

    def convert(index, example):
        image_seed = tf.stack([tf.cast(seed, tf.int64), index])
        image = preprocess(
            example["image"],
            d.image_size,
            d.channels,
            flip,
            image_seed,
            dequantize=train and d.dequantize,
        )
        out = {"image": image}
        out["label"] = tf.cast(example["label"], tf.int32) if has_label else tf.zeros((), tf.int32)
        return out

    if train:
        ds = ds.repeat()
        ds = ds.shuffle(d.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.enumerate().map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_host, drop_remainder=train)
    if start_step:
        ds = ds.skip(start_step)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    yield from tfds.as_numpy(ds)
