"""Input pipelines without a network: the embedded digits, tfds mock data, and the real
cifar10 builder run on small fake files in the CIFAR binary format."""

import os
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import parallel
from diffusion_jax.config import base_config
from diffusion_jax.data import digits, fake, pipeline, tfds_source


def test_digits_splits():
    train_x, train_y = digits.load_digits("train", 16)
    test_x, test_y = digits.load_digits("test", 16)
    assert train_x.shape == (1797 - digits.HELD_OUT, 16, 16, 1) and train_x.dtype == np.float32
    assert test_x.shape == (digits.HELD_OUT, 16, 16, 1)
    assert train_x.min() >= -1 and train_x.max() <= 1 and train_x.min() < -0.99
    assert set(np.unique(train_y)) == set(range(10)) and train_y.dtype == np.int32
    # The held-out part shares no image with the training part.
    train_set = {x.tobytes() for x in train_x}
    assert not any(x.tobytes() in train_set for x in test_x)


def in_memory(process_index, process_count, start_step=0, flip=False):
    images, labels = digits.load_digits("train", 16)
    return pipeline.in_memory_batches(
        images,
        labels,
        global_batch=32,
        seed=3,
        start_step=start_step,
        random_flip=flip,
        process_index=process_index,
        process_count=process_count,
    )


def test_in_memory_processes_read_disjoint_rows_whose_union_is_the_batch():
    whole = in_memory(0, 1)
    p0, p1 = in_memory(0, 2), in_memory(1, 2)
    per_epoch = (1797 - digits.HELD_OUT) // 32
    seen = [set(), set()]
    for step in range(60):  # past the first epoch boundary
        a, b, full = next(p0), next(p1), next(whole)
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), full["image"])
        if step < per_epoch:
            seen[0] |= {x.tobytes() for x in a["image"]}
            seen[1] |= {x.tobytes() for x in b["image"]}
    # Within an epoch the two processes never read the same example.
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == per_epoch * 32 - _duplicates_in_digits()


def _duplicates_in_digits():
    images, _ = digits.load_digits("train", 16)
    return len(images) - len({x.tobytes() for x in images})


def test_in_memory_resume_is_exact():
    it = in_memory(0, 1, flip=True)
    batches = [next(it) for _ in range(7)]
    resumed = in_memory(0, 1, start_step=4, flip=True)
    for b in batches[4:]:
        r = next(resumed)
        np.testing.assert_array_equal(r["image"], b["image"])
        np.testing.assert_array_equal(r["label"], b["label"])


def test_global_batches_are_sharded_over_the_mesh():
    config = base_config()
    config.mesh.data, config.mesh.fsdp = 4, 2
    mesh = parallel.make_mesh(config)
    batch = next(pipeline.create_iterator(config, mesh, split="train", global_batch=32))
    assert batch["image"].shape == (32, 16, 16, 1)
    assert batch["image"].sharding.spec == parallel.batch_sharding(mesh).spec
    assert len(batch["image"].addressable_shards) == 8


def tfds_config(name, data_dir="", image_size=32, channels=3, flip=True):
    config = base_config()
    d = config.data
    d.dataset, d.data_dir, d.image_size, d.channels, d.random_flip = (
        name,
        data_dir,
        image_size,
        channels,
        flip,
    )
    d.shuffle_buffer = 64
    return config


@pytest.mark.parametrize(
    "name,size,channels", [("cifar10", 32, 3), ("mnist", 32, 1), ("celeb_a_hq/256", 64, 3)]
)
def test_mock_tfds_batches(name, size, channels):
    config = tfds_config(name, image_size=size, channels=channels)
    with tfds.testing.mock_data(num_examples=16):
        batch = next(
            tfds_source.batches(
                config, split="train", global_batch=8, seed=0, start_step=0, train=True
            )
        )
    assert batch["image"].shape == (8, size, size, channels)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_flips_only_in_training():
    import tensorflow as tf

    with tfds.testing.mock_data(num_examples=16):
        plain = next(
            tfds_source.batches(
                tfds_config("cifar10", flip=False),
                split="train",
                global_batch=16,
                seed=0,
                start_step=0,
                train=False,
            )
        )
        evaluation = next(
            tfds_source.batches(
                tfds_config("cifar10"),
                split="train",
                global_batch=16,
                seed=0,
                start_step=0,
                train=False,
            )
        )
    np.testing.assert_array_equal(plain["image"], evaluation["image"])
    # A horizontal ramp: flipped images start bright, unflipped ones dark.
    image = tf.constant(np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3)))
    first_pixels = {
        float(np.asarray(tfds_source.preprocess(image, 32, 3, True, tf.constant([0, s])))[0, 0, 0])
        for s in range(16)
    }
    assert min(first_pixels) == -1.0 and max(first_pixels) > 0.8
    kept = np.asarray(tfds_source.preprocess(image, 32, 3, False, tf.constant([0, 0])))
    assert kept[0, 0, 0] == -1.0


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    """The real cifar10 builder, its download pointed at small files in the CIFAR format."""
    return fake.prepare_fake_cifar10(tmp_path_factory.mktemp("cifar"))


def test_prepared_cifar10_loads_offline_in_a_new_process(fake_cifar10):
    code = (
        "import tensorflow_datasets as tfds\n"
        f"ds = tfds.load('cifar10', split='train', data_dir={fake_cifar10!r}, download=False)\n"
        "print(sum(1 for _ in ds))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "40"


def collect(
    config, *, split, process_index, process_count, steps, start_step=0, train=True, batch=4
):
    with (
        mock.patch.object(jax, "process_index", lambda: process_index),
        mock.patch.object(jax, "process_count", lambda: process_count),
    ):
        it = tfds_source.batches(
            config,
            split=split,
            global_batch=batch * process_count,
            seed=5,
            start_step=start_step,
            train=train,
        )
        return [next(it) for _ in range(steps)]


def test_two_processes_read_disjoint_parts_whose_union_is_the_split(fake_cifar10):
    config = tfds_config("cifar10", fake_cifar10, flip=False)
    parts = [
        collect(
            config, split="test", process_index=i, process_count=2, steps=2, train=False, batch=3
        )
        for i in range(2)
    ]
    rows = [{x.tobytes() for b in part for x in b["image"]} for part in parts]
    assert not rows[0] & rows[1]
    whole = collect(
        config, split="test", process_index=0, process_count=1, steps=1, train=False, batch=12
    )[0]
    assert rows[0] | rows[1] == {x.tobytes() for x in whole["image"]}


def test_tfds_resume_is_exact(fake_cifar10):
    config = tfds_config("cifar10", fake_cifar10)
    straight = collect(config, split="train", process_index=0, process_count=1, steps=15)
    resumed = collect(
        config, split="train", process_index=0, process_count=1, steps=5, start_step=10
    )
    for a, b in zip(straight[10:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_missing_dataset_fails_fast_with_the_fix(tmp_path):
    config = tfds_config("cifar10", str(tmp_path / "nothing"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        next(
            tfds_source.batches(
                config, split="train", global_batch=8, seed=0, start_step=0, train=True
            )
        )
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "'cifar10'" in message and str(tmp_path / "nothing") in message
    assert "tfds build cifar10" in message and "data.download=True" in message


def test_uniform_dequantization():
    import tensorflow as tf

    image = tf.constant(np.full((8, 8, 3), 128, np.uint8))
    out = np.asarray(
        tfds_source.preprocess(image, 8, 3, False, tf.constant([0, 3], tf.int64), dequantize=True)
    )
    # (128 + u) / 128 - 1 with u in [0, 1): strictly inside the bin, not on the grid.
    assert out.min() >= 0.0 and out.max() < 1.0 / 128 and out.std() > 1e-4


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(25):
            pixels = rng.integers(0, 256, (20 + c, 30, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i:03d}.png")
    config = tfds_config("folder", str(tmp_path), image_size=8, channels=3)
    train_x, train_y = pipeline.load_in_memory(config, "train")
    test_x, test_y = pipeline.load_in_memory(config, "test")
    assert len(train_x) + len(test_x) == 50 and len(test_x) == 3
    assert train_x.shape[1:] == (8, 8, 3) and train_x.min() >= -1 and train_x.max() <= 1
    assert set(train_y) == {0, 1}
    mesh = parallel.make_mesh(base_config(), jax.devices()[:2])
    batch = next(pipeline.create_iterator(config, mesh, split="train", global_batch=4))
    assert batch["image"].shape == (4, 8, 8, 3)
    with pytest.raises(FileNotFoundError, match="config.data.data_dir"):
        pipeline.load_in_memory(tfds_config("folder", str(tmp_path / "none")), "train")
