"""The command line: `diffusion-jax --config=configs/digits.py --workdir=runs/digits`.

--config=FILE[:ARG]   a Python file with get_config(arg) (ml_collections config_flags)
--config.a.b=value    overrides of any field, type-checked against the config
--workdir=DIR         where checkpoints, samples, metrics and evaluations go
--mode=train|eval|sample|export|encode   (encode: a latent run's data to latent shards)
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import config as config_lib  # noqa: E402
from diffusion_jax.config import ConfigError  # noqa: E402

MODES = ("train", "eval", "sample", "export", "encode")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/digits.py:smoke.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and metrics.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for multi-process runs off Cloud TPU and SLURM.",
)
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def enable_compilation_cache() -> None:
    """Repeated runs reuse compiled programs: JAX's persistent cache, in
    $JAX_COMPILATION_CACHE_DIR or ~/.cache/diffusion_jax/xla."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        path = os.path.expanduser("~/.cache/diffusion_jax/xla")
        jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Our progress at INFO; the libraries' (orbax's per-save chatter) only from WARNING up.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("diffusion_jax").setLevel(logging.INFO)
    from diffusion_jax import parallel

    enable_compilation_cache()
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    if not parallel.is_main_process():  # one voice for the whole job
        logging.getLogger("diffusion_jax").setLevel(logging.WARNING)
    config = FLAGS.config
    if FLAGS.mode == "train":
        from diffusion_jax.training.loop import train_and_evaluate

        state = train_and_evaluate(config, FLAGS.workdir)
        if config.training.eval_at_end:
            from diffusion_jax.evaluation.evaluate import evaluate

            evaluate(config, FLAGS.workdir, steps=[int(state.step)])
    elif FLAGS.mode == "eval":
        from diffusion_jax.evaluation.evaluate import evaluate

        evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        from diffusion_jax.sample import sample

        sample(config, FLAGS.workdir)
    elif FLAGS.mode == "encode":
        from diffusion_jax.encode import encode_dataset

        config_lib.validate(config)
        if not config_lib.is_latent(config):
            raise ConfigError("config.autoencoder.weights: --mode=encode needs an autoencoder")
        encode_dataset(config, FLAGS.workdir)
    else:
        from diffusion_jax.export_ema import export_ema

        export_ema(config, FLAGS.workdir)


def _one_line_errors(argv):
    """Config problems end the program with one line naming the field, not a traceback."""
    try:
        main(argv)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    app.run(_one_line_errors)


if __name__ == "__main__":
    run()
