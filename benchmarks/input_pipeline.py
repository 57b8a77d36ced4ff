"""Images/s of the input pipelines alone (no model), one JSON line per measurement.

    python benchmarks/input_pipeline.py [--examples=20000] [--batch=128] [--batches=100]

cifar10: the real tfds cifar10 builder run on random files in the CIFAR binary format
(prepared once in a temporary directory), read with decode, crop/resize, flip, shuffle and
batching as training does. digits: the in-memory pipeline of the default run.
"""

import argparse
import json
import tempfile
import time

import jax
import numpy as np

from diffusion_jax.config import base_config
from diffusion_jax.data import digits, fake, pipeline, tfds_source


def measure(iterator, batches: int, batch: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    common = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "batch": args.batch}

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = fake.prepare_fake_cifar10(tmp, train_per_file=args.examples // 5)
        config = base_config()
        d = config.data
        d.dataset, d.data_dir, d.image_size, d.channels, d.random_flip = (
            "cifar10",
            data_dir,
            32,
            3,
            True,
        )
        rates = [
            measure(
                tfds_source.batches(
                    config, split="train", global_batch=args.batch, seed=r, start_step=0, train=True
                ),
                args.batches,
                args.batch,
            )
            for r in range(args.repeats)
        ]
        print(
            json.dumps(
                {
                    "pipeline": "tfds cifar10 (32x32x3, flip, shuffle)",
                    "images_per_sec": round(float(np.median(rates)), 1),
                    **common,
                }
            )
        )

    images, labels = digits.load_digits("train", 16)
    rates = [
        measure(
            pipeline.in_memory_batches(
                images,
                labels,
                global_batch=args.batch,
                seed=r,
                start_step=0,
                random_flip=False,
                process_index=0,
                process_count=1,
            ),
            args.batches,
            args.batch,
        )
        for r in range(args.repeats)
    ]
    print(
        json.dumps(
            {
                "pipeline": "digits in memory (16x16x1)",
                "images_per_sec": round(float(np.median(rates)), 1),
                **common,
            }
        )
    )


if __name__ == "__main__":
    main()
