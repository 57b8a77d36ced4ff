"""The command line: `diffusion-jax --config=configs/digits.py --workdir=runs/digits`.

--config=FILE[:ARG]   a Python file with get_config(arg) (ml_collections config_flags)
--config.a.b=value    overrides of any field, type-checked against the config
--workdir=DIR         where checkpoints, samples, metrics and evaluations go
--mode=train|eval|sample|export|encode   (encode: a latent run's data to latent shards)

Exit statuses: 0 done (also after SIGTERM, having saved); 1 a fault while running (a
checkpoint that cannot be written, a run of non-finite steps); 2 bad input, one line
`error: <field or path>: what is wrong; what to do` before anything compiles or is written;
130 stopped by Ctrl-C after saving; 143 SIGTERM outside training (compiling, evaluating,
sampling). DIFFUSION_JAX_TRACEBACK=1 adds the traceback to errors.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import cli_args  # noqa: E402
from diffusion_jax.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    NonFiniteError,
    Stopped,
    first_line,
)

MODES = ("train", "eval", "sample", "export", "encode", "posthoc_ema")
EXIT_FAULT, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143
TRACEBACK_ENV = "DIFFUSION_JAX_TRACEBACK"
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

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

OWN_FLAGS = ("config", "workdir", "mode", "coordinator_address", "num_processes", "process_id")

HELP = """\
diffusion-jax: train, sample and evaluate denoising diffusion models (JAX/Flax).

usage: diffusion-jax --config=FILE[:ARG] --workdir=DIR [--mode=MODE]
                     [--config.SECTION.FIELD=VALUE ...]

modes:
  train   (default) train to training.num_steps, resuming from the newest checkpoint in
          --workdir; writes checkpoints, sample grids, metrics.jsonl and TensorBoard scalars
  eval    score every checkpoint without a result for these settings -> eval/step_<N>.json
  sample  sample grid, .npz and reverse process of the newest checkpoint (or a prompt's
          images from a pipeline folder, config.pretrained)
  export  the EMA weights of a checkpoint as one .msgpack file (+ its config .json), or
          as a diffusers pipeline folder (eval.export_format=diffusers, fine-tuning runs)
  encode  a latent run's data set through its autoencoder to latent shards
  posthoc_ema  rebuild the EMA of width eval.ema_sigma_rel from the snapshots of the
          power-function EMAs (EDM2) -> posthoc_ema/; eval.ema_sigma_rels scores a sweep

flags:
{flags}

examples:
  diffusion-jax --config=configs/digits.py --workdir=runs/digits
  diffusion-jax --config=configs/cifar10.py:smoke --workdir=/tmp/c10 --config.training.batch_size=16
  diffusion-jax --config=configs/digits.py --workdir=runs/digits --mode=eval \\
      --config.sampling.num_steps=20

Every config field can be overridden (see configs/ and diffusion_jax/config.py). Exit
statuses: 0 done, 1 a fault while running, 2 bad input (one `error:` line), 130 Ctrl-C after
saving, 143 SIGTERM outside training; {env}=1 shows tracebacks. All of absl's flags: --helpfull.
"""


def help_text() -> str:
    lines = []
    for name in OWN_FLAGS:
        flag = FLAGS[name]
        default = "" if flag.default is None else f" (default: {flag.default})"
        lines.append(f"  --{name}: {flag.help}{default}")
    return HELP.format(flags="\n".join(lines), env=TRACEBACK_ENV)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake turned into one `cli_args.UsageError` line."""
    spec = cli_args.config_argument(argv[1:])
    names = list(FLAGS)
    if spec is not None:
        config = cli_args.check_config_argument(spec)
        cli_args.check_overrides(argv[1:], config)
        names += [f"config.{name}" for name in cli_args.leaf_fields(config)]
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        raise cli_args.UsageError(cli_args.describe_flag_error(e, names)) from e
    if len(rest) > 1:
        raise cli_args.UsageError(
            f"{rest[1]}: unexpected argument; flags take the form --name=value"
        )
    return rest


def quiet_libraries() -> None:
    """Our progress at INFO; the libraries' (orbax's per-save and restore chatter, tfds's
    notes on its folders) only when they are errors."""
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("diffusion_jax").setLevel(logging.INFO)
    # gcsfs logs each failed request with its traceback; what failed ends the run in one line.
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    # `python -m diffusion_jax` imports diffusion_jax.main before runpy runs it as __main__.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")


class Terminated(Exception):
    """SIGTERM outside the training loop (which saves a checkpoint and stops on its own)."""


def _terminate(signum, frame):
    raise Terminated("stopped by SIGTERM; nothing was being trained, so nothing needed saving")


def main(argv) -> None:
    del argv  # parse_flags refuses positional arguments
    signal.signal(signal.SIGTERM, _terminate)
    quiet_libraries()
    from diffusion_jax import parallel, preflight

    parallel.enable_compilation_cache()
    parallel.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    if not parallel.is_main_process():  # one voice for the whole job
        logging.getLogger("diffusion_jax").setLevel(logging.WARNING)
    config, workdir, mode = FLAGS.config, FLAGS.workdir, FLAGS.mode
    config = preflight.resolve(config, workdir, mode)  # the one config every job runs
    preflight.check(config, workdir, mode)
    if mode == "train":
        from diffusion_jax.jobs.train import train_and_evaluate

        state = train_and_evaluate(config, workdir)
        if config.training.eval_at_end:
            from diffusion_jax.evaluation.evaluate import evaluate

            evaluate(config, workdir, steps=[int(state.step)])
    elif mode == "eval":
        from diffusion_jax.evaluation.evaluate import evaluate

        evaluate(config, workdir)
    elif mode == "sample":
        from diffusion_jax.jobs.sample import sample

        sample(config, workdir)
    elif mode == "encode":
        from diffusion_jax.jobs.encode import encode_dataset

        encode_dataset(config, workdir)
    elif mode == "posthoc_ema":
        from diffusion_jax.jobs.posthoc_ema import posthoc_ema

        posthoc_ema(config, workdir)
    else:
        from diffusion_jax.jobs.export_ema import export_ema

        export_ema(config, workdir)


def exit_status(error: BaseException) -> int | None:
    """The exit status of an error that ends the program with one line, or None for a bug
    (which keeps its traceback)."""
    if isinstance(error, cli_args.UsageError | ConfigError | FileNotFoundError):
        return EXIT_BAD_INPUT
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, Terminated):
        return EXIT_TERMINATED
    if isinstance(error, Stopped):
        return EXIT_INTERRUPTED if error.signal_name == "SIGINT" else 0
    if isinstance(error, CheckpointError | NonFiniteError):
        return EXIT_FAULT
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return EXIT_FAULT  # a full or read-only disk under metrics, TensorBoard or pictures
    return None


def error_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "stopped by Ctrl-C"
    return first_line(error)


def run() -> None:
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in sys.argv[1:]):
        print(help_text())
        sys.exit(0)
    try:
        app.run(main, flags_parser=parse_flags)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - mapped to a status below
        status = exit_status(error)
        if status is None:
            raise
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
        line = error_line(error)
        print(f"error: {line}" if status in (EXIT_FAULT, EXIT_BAD_INPUT) else line, file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    run()
