"""Reference statistics for FID: mu and sigma of the FID Inception's pool3 features (and the
features themselves, for precision/recall) of a tfds split or a folder of images.

    python -m diffusion_jax.tools.reference_stats --config=configs/cifar10.py \\
        --split=train --out=cifar10_train.npz \\
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth
    python -m diffusion_jax.tools.reference_stats --config=configs/cifar10.py \\
        --folder=my_images/ --out=my_images.npz --config.eval.inception_weights=...

Images go through the same uint8 quantisation as generated samples; a tfds split is read in
full (no flips), a folder's PNG/JPEG files in sorted order.
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax.evaluation.reference_stats import compute, folder_images, split_images

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run config (data and eval sections).")
flags.DEFINE_string("split", None, "tfds split, e.g. train or test[:10000].")
flags.DEFINE_string("folder", None, "A folder of PNG/JPEG images instead of a tfds split.")
flags.DEFINE_string("out", None, "Output .npz with mu, sigma, features.")
flags.DEFINE_integer("max_images", 50_000, "Use at most this many images.")


def main(argv) -> None:
    del argv
    logging.getLogger("diffusion_jax").setLevel(logging.INFO)
    config = FLAGS.config
    if not FLAGS.out or bool(FLAGS.split) == bool(FLAGS.folder):
        raise app.UsageError("give --out and exactly one of --split, --folder")
    if FLAGS.folder:
        images = folder_images(
            FLAGS.folder, config.data.image_size, config.data.channels, FLAGS.max_images
        )
    else:
        images = split_images(config, FLAGS.split, FLAGS.max_images)
    compute(config, images, FLAGS.out)
    print(f"wrote {FLAGS.out} ({len(images)} images, {jax.device_count()} devices)")


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
