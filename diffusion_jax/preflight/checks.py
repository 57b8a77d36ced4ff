"""Everything a run needs, checked before anything compiles or is written.

`check(config, workdir, mode)` raises on the first problem, with one line naming the field
or path, what is wrong and what to do (`ConfigError`, `FileNotFoundError`); main.py prints
it as `error: ...` and exits with status 2. What it checks, in order:

(The config itself, every field's range and cross-field rule, was validated when it was
resolved: `preflight.resolve`.)

1. the workdir: the same one for every process of the run; a directory (or one that can
   be made), or a bucket's prefix, writable, with room (on a disk) for a checkpoint
   of this model (train and encode), or holding a checkpoint to read (eval, sample,
   export), EMA snapshots to rebuild from (posthoc_ema) and the rebuilt EMA that
   eval.ema_sigma_rel names;
2. the data (train, encode, and evaluation that reads held-out data): a tfds data set
   prepared, an image folder with images;
3. the files the config names: eval.params_file, eval.inception_weights and
   eval.reference_stats when a metric needs them, autoencoder.weights, text_encoder.weights,
   the pipeline folder of config.pretrained: present, readable and of the claimed format.

Nothing here writes but small probe files, removed at once (whether the workdir can be
written, whether every process sees it; a multi-process run's workdir folder is made for
that): a failed pre-flight leaves the workdir's contents as they were.
"""

from __future__ import annotations

from diffusion_jax import config as config_lib
from diffusion_jax import paths
from diffusion_jax.errors import ConfigError
from diffusion_jax.preflight import files
from diffusion_jax.preflight import workdir as workdir_checks
from diffusion_jax.preflight.resumable import check_resumable_config
from diffusion_jax.weights import checkpoint_step_arg, current_posthoc_step, is_rebuilt


def check(config, workdir, mode: str) -> None:
    """Raises on the first problem of the run `mode` of `config` in `workdir` (module doc)."""
    workdir = paths.path(workdir)
    workdir_checks.check_shared_workdir(workdir)
    if mode == "encode" and not config_lib.is_latent(config):
        raise ConfigError("config.autoencoder.weights: --mode=encode needs an autoencoder")
    if mode in ("train", "encode"):
        workdir_checks.check_writable_workdir(
            workdir, workdir_checks.checkpoint_bytes(config) if mode == "train" else 0
        )
    files.check_files(config)
    if mode in ("train", "encode"):
        files.check_data(config, config.data.train_split)
    evaluates = (
        mode == "eval"
        or (mode == "train" and (config.training.eval_at_end or config.training.eval_every))
        or (mode == "posthoc_ema" and config.eval.ema_sigma_rels)
    )
    if evaluates:
        files.check_eval_inputs(config)
    if mode == "posthoc_ema":
        workdir_checks.check_posthoc(config, workdir)
    elif mode in ("eval", "sample", "export") and not (
        config.eval.params_file or (mode == "sample" and config.pretrained)
    ):
        if is_rebuilt(config):  # eval.checkpoint_step names the step of a rebuild
            current_posthoc_step(workdir, config.eval.ema_sigma_rel, checkpoint_step_arg(config))
        else:
            workdir_checks.check_has_checkpoint(config, workdir)
    if mode != "encode" and not config.eval.params_file and not config.pretrained:
        # The checkpoints of the workdir were trained with its config.json: a model or
        # diffusion setting that differs would restore them into the wrong model or score
        # them with the wrong process.
        check_resumable_config(config, workdir)
