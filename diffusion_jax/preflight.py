"""Everything a run needs, checked before anything compiles or is written.

`check(config, workdir, mode)` raises on the first problem, with one line naming the field
or path, what is wrong and what to do (`ConfigError`, `FileNotFoundError`); main.py prints
it as `error: ...` and exits with status 2. What it checks, in order:

1. the config: every field's range and cross-field rule (`config.validate`), with the
   devices of this job;
2. the workdir: a directory (or one that can be made), writable, with room for a checkpoint
   of this model (train and encode), or holding a checkpoint to read (eval, sample,
   export), EMA snapshots to rebuild from (posthoc_ema) and the rebuilt EMA that
   eval.ema_sigma_rel names;
3. the data (train, encode, and evaluation that reads held-out data): a tfds data set
   prepared, an image folder with images;
4. the files the config names: eval.params_file, eval.inception_weights and
   eval.reference_stats when a metric needs them, autoencoder.weights, text_encoder.weights,
   the pipeline folder of config.pretrained: present, readable and of the claimed format.

Nothing here writes: a failed pre-flight leaves the workdir as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from diffusion_jax import checkpointing, export, validation
from diffusion_jax import config as config_lib
from diffusion_jax.data import folder, pipeline
from diffusion_jax.errors import ConfigError, first_line
from diffusion_jax.run import schedule_from_config

# Bytes a checkpoint holds per parameter: params, EMA and Adam's two moments, float32.
CHECKPOINT_BYTES_PER_PARAMETER = 16


def check(config, workdir, mode: str) -> None:
    """Raises on the first problem of the run `mode` of `config` in `workdir` (module doc)."""
    validation.validate(config, jax.device_count())
    workdir = Path(workdir)
    if mode == "encode" and not config_lib.is_latent(config):
        raise ConfigError("config.autoencoder.weights: --mode=encode needs an autoencoder")
    if mode in ("train", "encode"):
        check_writable_workdir(workdir, checkpoint_bytes(config) if mode == "train" else 0)
    check_files(config)
    if mode in ("train", "encode"):
        check_data(config, config.data.train_split)
    evaluates = (
        mode == "eval"
        or (mode == "train" and (config.training.eval_at_end or config.training.eval_every))
        or (mode == "posthoc_ema" and config.eval.ema_sigma_rels)
    )
    if evaluates:
        check_eval_inputs(config)
    if mode == "posthoc_ema":
        check_posthoc(config, workdir)
    elif mode in ("eval", "sample", "export") and not (
        config.eval.params_file or (mode == "sample" and config.pretrained)
    ):
        check_has_checkpoint(config, workdir)
        width = config.eval.ema_sigma_rel
        if width > 0 and width not in tuple(config.optim.ema_sigma_rels):
            from diffusion_jax.run import checkpoint_step_arg, posthoc_steps

            posthoc_steps(workdir, width, checkpoint_step_arg(config))
    if mode != "encode" and not config.eval.params_file and not config.pretrained:
        # The checkpoints of the workdir were trained with its config.json: a model or
        # diffusion setting that differs would restore them into the wrong model or score
        # them with the wrong process.
        from diffusion_jax.jobs.train import check_resumable_config

        check_resumable_config(config, workdir)


def checkpoint_bytes(config) -> int:
    """The size of one checkpoint of this model, from its parameter shapes (no allocation)."""
    from diffusion_jax import objectives
    from diffusion_jax.models.factory import abstract_params

    objective = objectives.for_config(config, schedule_from_config(config))
    shapes = abstract_params(objective.create_model(config), *objective.init_inputs(config))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    profiles = 4 * len(config.optim.ema_sigma_rels)  # the power-function EMAs, float32
    return count * (CHECKPOINT_BYTES_PER_PARAMETER + profiles)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_workdir(workdir: Path, needed_bytes: int) -> None:
    """A directory (or a path one can be made at) where this process can write, with room
    for two checkpoints (a new one is complete before the oldest is removed)."""
    where = f"--workdir={workdir}"
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{where}: is a file, not a directory; give a directory")
    base = _existing_ancestor(workdir)
    if not base.is_dir():
        raise ConfigError(f"{where}: {base} is a file, not a directory")
    for path in (base, workdir / "checkpoints"):
        if path.is_dir() and not _can_write_in(path):
            raise ConfigError(
                f"{where}: cannot write in {path} (permissions, or a read-only file system); "
                "fix it or use another --workdir"
            )
    free = shutil.disk_usage(base).free
    if needed_bytes and free < 2 * needed_bytes:
        raise ConfigError(
            f"{where}: {free / 2**20:.0f} MiB free on its disk, a checkpoint of this model "
            f"needs {needed_bytes / 2**20:.0f} MiB (two are kept while a save completes); free "
            "space or use another --workdir"
        )


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`: tried, since permission bits do not tell for
    root, read-only mounts or immutable folders. The file is gone when this returns."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".diffusion_jax_write_check"):
            return True
    except OSError:
        return False


def check_data(config, split: str) -> None:
    """The data of `split` can be read: a tfds data set is prepared (or data.download is on),
    an image folder holds images. Latent shards are checked (and made) by the run."""
    d = config.data
    if config_lib.is_latent(config) and (Path(d.latents or "") / f"{split}-meta.json").exists():
        return
    if d.dataset == "folder":
        folder.list_images(d.data_dir)
    elif d.dataset not in pipeline.IN_MEMORY and not d.download:
        check_tfds_prepared(d.dataset, d.data_dir)


def check_tfds_prepared(name: str, data_dir: str) -> None:
    from diffusion_jax.data import tfds_source

    tfds_source.check_prepared(name, data_dir)


def check_eval_inputs(config) -> None:
    """The files the evaluation metrics of a diffusion run need, and the held-out data."""
    e = config.eval
    if config.training.objective != "diffusion":
        check_data(config, config.data.eval_split)
        return
    if "digits_fd" in e.metrics and config.data.dataset != "digits":
        raise ConfigError(
            f"config.eval.metrics: digits_fd scores digits, data.dataset is "
            f"{config.data.dataset!r}; use fid (or training.eval_at_end=False)"
        )
    if any(m in config_lib.INCEPTION_METRICS for m in e.metrics):
        check_inception_weights(e.inception_weights, [m for m in e.metrics])
    if any(m in config_lib.REFERENCE_METRICS for m in e.metrics):
        check_reference_stats(e.reference_stats)
    if "bpd" in e.metrics:
        check_data(config, config.data.eval_split)


def check_inception_weights(path: str, metrics) -> None:
    from diffusion_jax.evaluation import inception

    field = "config.eval.inception_weights"
    if not path:
        raise ConfigError(
            f"{field}: needed for {[m for m in metrics if m in config_lib.INCEPTION_METRICS]}; "
            f"download {inception.WEIGHTS_URL} and pass its path"
        )
    _require_file(path, field)
    try:
        inception.params_from_state_dict(inception.load_state_dict(path))
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, one line
        raise ConfigError(
            f"{field}={path}: not pytorch-fid's Inception weights (.pth) or their .npz "
            f"({_reason(e)}); download {inception.WEIGHTS_URL}"
        ) from e


def check_reference_stats(path: str) -> None:
    from diffusion_jax.evaluation import metrics

    field = "config.eval.reference_stats"
    if not path:
        raise ConfigError(
            f"{field}: needed for FID; make one with `python -m "
            "diffusion_jax.tools.reference_stats` or use guided-diffusion's batch"
        )
    _require_file(path, field)
    try:
        metrics.load_stats(path)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{field}={path}: not reference statistics ({_reason(e)})") from e


def check_posthoc(config, workdir: Path) -> None:
    """--mode=posthoc_ema: a width to rebuild, snapshots to rebuild it from, room to write."""
    e = config.eval
    if not (e.ema_sigma_rel > 0 or e.ema_sigma_rels):
        raise ConfigError(
            "config.eval.ema_sigma_rel: set the width to rebuild (e.g. 0.07), or a sweep in "
            "config.eval.ema_sigma_rels"
        )
    where = checkpointing.checkpoint_dir(workdir, checkpointing.EMA_SNAPSHOTS)
    manager = checkpointing.make_manager(
        workdir, read_only=True, folder=checkpointing.EMA_SNAPSHOTS
    )
    steps = sorted(manager.all_steps()) if where.is_dir() else []
    up_to = e.checkpoint_step
    if not [s for s in steps if up_to < 0 or s <= up_to]:
        upto = f" up to config.eval.checkpoint_step={up_to}" if up_to >= 0 and steps else ""
        raise ConfigError(
            f"{where}: no EMA snapshot{upto} to rebuild from; train with "
            "optim.ema_sigma_rels and training.ema_snapshot_every > 0"
        )
    check_writable_workdir(workdir, 0)


def check_has_checkpoint(config, workdir: Path) -> None:
    """A workdir with a checkpoint to read (and the one eval.checkpoint_step names)."""
    where = checkpointing.checkpoint_dir(workdir)
    steps = (
        sorted(checkpointing.make_manager(workdir, read_only=True).all_steps())
        if where.is_dir()
        else []
    )
    if not steps:
        raise ConfigError(
            f"{where}: no checkpoint to read; train first (--mode=train with this --workdir), "
            "or set eval.params_file to an exported .msgpack"
        )
    step = config.eval.checkpoint_step
    if step >= 0 and step not in steps:
        raise ConfigError(
            f"config.eval.checkpoint_step: no checkpoint {step} in {where} (have {steps})"
        )


def check_files(config) -> None:
    """Every file the config names exists and is of its kind."""
    if config.pretrained:
        check_pipeline(config.pretrained)
    if config.eval.params_file:
        check_params_file(config.eval.params_file)
    # A pipeline folder brings its own autoencoder; an autoencoder run trains the one it names.
    if config_lib.is_latent(config) and not config.pretrained:
        check_autoencoder(config)
    if config.text_encoder.weights:
        check_text_encoder(config.text_encoder.weights, "config.text_encoder.weights")


def check_params_file(path: str) -> None:
    field = "config.eval.params_file"
    _require_file(path, field)
    try:
        export.load_params(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"{field}={path}: not a parameters file written by --mode=export ({_reason(e)})"
        ) from e


def check_autoencoder(config) -> None:
    """autoencoder.weights loads and matches config.autoencoder (`run.load_autoencoder`)."""
    from diffusion_jax.run import load_autoencoder

    try:
        load_autoencoder(config)
    except (ConfigError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001
        source = config.autoencoder.weights or Path(config.pretrained) / "vae"
        raise ConfigError(
            f"config.autoencoder.weights={source}: cannot be read as an autoencoder ({_reason(e)})"
        ) from e


def check_text_encoder(path, field: str) -> None:
    """A folder with text_encoder/ (config.json + model.safetensors) and tokenizer/."""
    root = Path(path)
    for part in ("text_encoder/config.json", "tokenizer"):
        if not (root / part).exists():
            raise FileNotFoundError(
                f"{field}={path}: {root / part} does not exist; give a folder with "
                "text_encoder/ and tokenizer/ (a Stable Diffusion pipeline folder works)"
            )
    _check_safetensors(root / "text_encoder" / "model.safetensors", field)


def run_config(config):
    """The config the job runs: for a run fine-tuned from a pipeline folder
    (training.init_from), the folder's network over the config's run settings
    (`convert.finetune_config`), the folder checked first; else `config` itself."""
    source = config.training.init_from
    if not source:
        return config
    from diffusion_jax.models.convert import finetune_config

    check_pipeline(source, "config.training.init_from")
    try:
        return finetune_config(config)
    except ValueError as e:
        raise ConfigError(f"config.training.init_from={source}: {first_line(e)}") from e


def check_pipeline(path, field: str = "config.pretrained") -> None:
    """A diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    each weights file a readable safetensors file (its header; the tensors load later)."""
    root = Path(path)
    if not (root / "model_index.json").exists():
        raise FileNotFoundError(
            f"{field}={path}: {root / 'model_index.json'} does not exist; give a diffusers "
            "pipeline folder "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    for part in ("unet", "vae"):
        if not (root / part / "config.json").exists():
            raise FileNotFoundError(f"{field}={path}: {root / part / 'config.json'} is missing")
        _check_safetensors(root / part / "diffusion_pytorch_model.safetensors", field)
    check_text_encoder(path, field)


def _check_safetensors(path: Path, field: str) -> None:
    from safetensors import safe_open

    _require_file(path, field)
    try:
        with safe_open(str(path), "np") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{field}: {path} is not a safetensors file ({_reason(e)})") from e


def _require_file(path, field: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{field}={path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{field}={path}: not readable by this user")


def _reason(error: BaseException) -> str:
    return first_line(error, named=True, limit=120)
