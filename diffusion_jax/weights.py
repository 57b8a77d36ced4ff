"""Which parameters a job uses, in one place, each weight file read once per process.

- `job_params(config, workdir, run, step)`: what eval, sample and export score, draw from or
  write: eval.params_file (a file of --mode=export), the EMA of width eval.ema_sigma_rel
  (tracked by the checkpoints, or rebuilt by --mode=posthoc_ema), or the exponential EMA of
  a checkpoint (the newest readable, or eval.checkpoint_step), placed for the run's mesh.
- `load_autoencoder(config)`: the autoencoder a latent run works through (a diffusers
  AutoencoderKL folder, a file of --mode=export, or an autoencoder run's workdir), and
  `autoencoder_fingerprint(config)`, the sha256 its latent shards record.
- `pipeline_params(folder)`: the U-Net, autoencoder and text encoder of a pipeline folder;
  `init_params(config)`: the weights a run fine-tuned from one starts from.
- `text_encoder_stamp(folder)`: the size and modification time of a text encoder's weights,
  which tell latent shards made by it without hashing its 0.5 GB again.

Loading is cached per process by the source's path and the size and modification time of
its files, so a later change on disk is read again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import checkpointing, errors, export, objectives, paths
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import convert
from diffusion_jax.models.factory import abstract_params

POSTHOC_FOLDER = "posthoc_ema"


def checkpoint_step_arg(config) -> int | None:
    """eval.checkpoint_step, or None (the newest) when it is negative."""
    return config.eval.checkpoint_step if config.eval.checkpoint_step >= 0 else None


# --- the parameters eval, sample and export use ---------------------------------------------


def job_params(config, workdir, run, step: int | None = None):
    """(step, params placed for `run`'s mesh) of the module doc's first item; `step` None is
    the newest.

    Unless eval.checkpoint_step asked for `step` by name, an unreadable checkpoint is moved
    aside and the newest readable one not after it is used instead (else the next one after
    it), so that eval and sample work on a workdir whose newest checkpoint is corrupt.
    """
    width = config.eval.ema_sigma_rel
    if is_rebuilt(config):
        step = current_posthoc_step(workdir, width, step)
        return step, _load_placed(posthoc_path(workdir, width, step), run)
    if config.eval.params_file:
        # The step it was exported at: its samples get that step's noise, so that the file
        # scores exactly as its checkpoint does.
        step = export.exported_step(config.eval.params_file)
        return step or 0, _load_placed(config.eval.params_file, run)
    manager = checkpointing.make_manager(workdir, read_only=True)
    available = manager.all_steps()
    if not available:
        raise FileNotFoundError(
            f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}; "
            "train first (--mode=train) or set eval.params_file"
        )
    step = max(available) if step is None else step
    if step not in available:
        raise errors.ConfigError(
            f"config.eval.checkpoint_step: no checkpoint {step} in {manager.directory} "
            f"(have {sorted(available)})"
        )
    advice = None
    if config.eval.checkpoint_step >= 0:  # asked for by name: that one or an error
        candidates = [step]
        advice = f"choose another config.eval.checkpoint_step (have {sorted(available)})"
    else:
        candidates = sorted((s for s in available if s <= step), reverse=True)
        candidates += sorted(s for s in available if s > step)
    profile = None
    if width > 0:  # a tracked power-function EMA, read from the checkpoint itself
        tracked = tuple(config.optim.ema_sigma_rels)
        profile = (tracked.index(width), len(tracked))
    return checkpointing.first_readable(
        manager,
        candidates,
        lambda s: checkpointing.restore_ema(manager, s, run.abstract_state.ema_params, profile),
        advice,
    )


def is_rebuilt(config) -> bool:
    """Whether the job uses an EMA width that --mode=posthoc_ema rebuilt: eval.ema_sigma_rel
    is set and not one the checkpoints track (optim.ema_sigma_rels)."""
    width = config.eval.ema_sigma_rel
    return width > 0 and width not in tuple(config.optim.ema_sigma_rels)


def describe(config, step: int | None) -> str:
    """Which parameters a job used, for its log: the file, the EMA kind and width, the step."""
    width = config.eval.ema_sigma_rel
    if config.eval.params_file:
        return f"the parameters of eval.params_file={config.eval.params_file}"
    if is_rebuilt(config):
        return f"the EMA of width {width:g} rebuilt at step {step} (--mode=posthoc_ema)"
    if width > 0:
        return f"the EMA of width {width:g} tracked by checkpoint {step}"
    return f"the exponential EMA (decay {config.optim.ema_decay:g}) of checkpoint {step}"


def ema_file_name(config, step: int) -> str:
    """The stem of a file of these parameters: ema_step_<N> for a checkpoint's exponential
    EMA, ema_sigma_rel_<w>_step_<N> for a power-function one, file_<name> for a params file;
    so that files of different averages never overwrite each other."""
    width = config.eval.ema_sigma_rel
    if config.eval.params_file:
        return f"file_{Path(config.eval.params_file).stem}"
    if width > 0:
        return f"ema_sigma_rel_{width:.4f}_step_{step}"
    return f"ema_step_{step}"


def snapshot_steps(workdir) -> list[int]:
    """The steps of the EMA snapshots in <workdir>/ema_snapshots/, oldest first."""
    folder = checkpointing.checkpoint_dir(workdir, checkpointing.EMA_SNAPSHOTS)
    if not folder.is_dir():
        return []
    manager = checkpointing.make_manager(
        workdir, read_only=True, folder=checkpointing.EMA_SNAPSHOTS
    )
    return sorted(manager.all_steps())


def current_posthoc_step(workdir, sigma_rel: float, step: int | None = None) -> int:
    """The step of the rebuilt EMA of width `sigma_rel` a job uses: `step` when asked for by
    name, else the newest rebuild, which must be of the newest snapshot: a rebuild older than
    the training it averages is stale, and one line says so instead of being used."""
    steps = posthoc_steps(workdir, sigma_rel, step)
    if step is not None:
        return step
    newest, snapshots = max(steps), snapshot_steps(workdir)
    if snapshots and snapshots[-1] > newest:
        raise errors.ConfigError(
            f"config.eval.ema_sigma_rel: the EMA of width {sigma_rel} was rebuilt at step "
            f"{newest}, but the snapshots go on to step {snapshots[-1]}; run --mode=posthoc_ema "
            f"--config.eval.ema_sigma_rel={sigma_rel} again, or set "
            f"config.eval.checkpoint_step={newest}"
        )
    return newest


def posthoc_path(workdir, sigma_rel: float, step: int) -> paths.Path:
    """Where --mode=posthoc_ema writes the EMA of width `sigma_rel` rebuilt at `step`."""
    return paths.path(workdir) / POSTHOC_FOLDER / f"sigma_rel_{sigma_rel:.4f}_step_{step}.msgpack"


def posthoc_steps(workdir, sigma_rel: float, step: int | None = None) -> list[int]:
    """The steps, oldest first, at which --mode=posthoc_ema rebuilt the EMA of width
    `sigma_rel`; FileNotFoundError naming the fix when there is none (or not `step`)."""
    prefix = posthoc_path(workdir, sigma_rel, 0).name.rsplit("_", 1)[0] + "_"
    folder = paths.path(workdir) / POSTHOC_FOLDER
    names = [p.name for p in folder.glob(f"{prefix}*.msgpack")] if folder.is_dir() else []
    steps = sorted(int(n[len(prefix) : -len(".msgpack")]) for n in names)
    if not steps or (step is not None and step not in steps):
        at = f" at step {step}" if step is not None and steps else ""
        raise FileNotFoundError(
            f"config.eval.ema_sigma_rel: no EMA of width {sigma_rel} rebuilt{at} in {folder}; "
            f"run --mode=posthoc_ema --config.eval.ema_sigma_rel={sigma_rel} first"
        )
    return steps


def _load_placed(path, run):
    """The parameters of an exported file, placed like the run's parameters; one line naming
    the file (or training.train_text_encoder) when they are another network's."""
    params, _ = export.load_params(path)
    shardings = run.state_sharding.params
    checkpointing.check_text_encoder(params, shardings, str(path))
    if jax.tree.structure(params) != jax.tree.structure(shardings) or any(
        np.shape(x) != s.shape
        for x, s in zip(
            jax.tree.leaves(params), jax.tree.leaves(run.abstract_state.params), strict=True
        )
    ):
        raise errors.ConfigError(
            f"{path}: its parameters are not those of this config's model (its .json beside "
            "it has the config that wrote it)"
        )
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)


# --- the autoencoder of a latent run -------------------------------------------------------


def autoencoder_source(config) -> paths.Path:
    """autoencoder.weights, or the vae/ of the pipeline folder config.pretrained."""
    return paths.path(config.autoencoder.weights or Path(config.pretrained) / "vae")


def load_autoencoder(config):
    """(module, params) of the autoencoder a latent run works through, read once per process.

    `autoencoder.weights` names it: the workdir of a run with
    `training.objective="autoencoder"` (its newest checkpoint's EMA weights), a file written
    by `--mode=export`, or a diffusers AutoencoderKL folder (config.json + safetensors, e.g.
    Stable Diffusion's `vae/`; by default `<pretrained>/vae`). Its architecture must equal
    `config.autoencoder`.
    """
    source = autoencoder_source(config)
    if not source.exists():
        raise FileNotFoundError(
            f"config.autoencoder.weights: {source} does not exist; train one with "
            "--config.training.objective=autoencoder or give a diffusers AutoencoderKL folder"
        )
    key = _autoencoder_key(config, source)
    if key not in _AUTOENCODERS:
        _AUTOENCODERS.clear()  # one autoencoder per run: the newest read is the one kept
        _AUTOENCODERS[key] = {"params": _read_autoencoder(config, source)}
    return ae_lib.create_autoencoder(config), _AUTOENCODERS[key]["params"]


def autoencoder_fingerprint(config) -> str:
    """The sha256 of the autoencoder's parameter values (`export.params_fingerprint`), which
    latent shards record; computed once per process."""
    _, params = load_autoencoder(config)
    entry = _AUTOENCODERS[_autoencoder_key(config, autoencoder_source(config))]
    if "sha256" not in entry:
        entry["sha256"] = export.params_fingerprint(params)
    return entry["sha256"]


# (source, its files' sizes and times, config.autoencoder) -> {"params", "sha256"}
_AUTOENCODERS: dict[tuple, dict] = {}


def _autoencoder_key(config, source: Path) -> tuple:
    architecture = json.dumps(config.autoencoder.to_dict(), sort_keys=True, default=str)
    return str(source.resolve()), _stamp(source), architecture


def _read_autoencoder(config, source: Path):
    if source.is_dir() and (source / convert.WEIGHTS_FILE).exists():
        params, fields = convert.autoencoder_from_diffusers(source)
        ae_lib.check_architecture(config, fields, source)
    elif source.is_file():
        params, saved = export.load_params(source)
        ae_lib.check_architecture(config, saved.autoencoder.to_dict(), source)
    else:
        params = _restore_autoencoder_run(config, source)
    return jax.tree.map(jnp.asarray, params)


def _restore_autoencoder_run(config, source: Path):
    """The newest EMA parameters of the autoencoder run in workdir `source`."""
    run_config = source / "config.json"
    if not run_config.exists():
        raise FileNotFoundError(
            f"config.autoencoder.weights: {source} is not an autoencoder run (no config.json), "
            "an exported .msgpack or a diffusers AutoencoderKL folder"
        )
    saved = json.loads(run_config.read_text())
    if saved["training"].get("objective") != "autoencoder":
        raise errors.ConfigError(
            f"config.autoencoder.weights: {source} trained "
            f"{saved['training'].get('objective', 'diffusion')!r}, not an autoencoder"
        )
    ae_lib.check_architecture(config, saved["autoencoder"], run_config)
    manager = checkpointing.make_manager(source, read_only=True)
    steps = manager.all_steps()
    if not steps:
        where = checkpointing.checkpoint_dir(source)
        raise FileNotFoundError(f"config.autoencoder.weights: no checkpoint in {where}")
    autoencoder = objectives.autoencoder(config)
    abstract = abstract_params(autoencoder.create_model(config), *autoencoder.init_inputs(config))
    params = checkpointing.restore_ema(manager, max(steps), abstract)
    manager.close()
    return params


def _stamp(path: Path) -> tuple:
    """(name, size, mtime_ns) of the files that make `path`'s weights: the file itself, a
    diffusers folder's weights file, or a workdir's config.json and checkpoint folders."""
    if path.is_file():
        files = [path]
    elif (path / convert.WEIGHTS_FILE).exists():
        files = [path / convert.WEIGHTS_FILE, path / "config.json"]
    else:
        folder = checkpointing.checkpoint_dir(path)
        files = [path / "config.json"] + (sorted(folder.iterdir()) if folder.is_dir() else [])
    return tuple((str(f), *_size_and_time(f)) for f in files)


def _size_and_time(path: Path) -> tuple[int, int]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    if isinstance(info, os.stat_result):
        return info.st_size, info.st_mtime_ns
    return info.length, int(info.mtime * 1e9)  # epath's stat, of an object in a bucket


# --- pipeline folders ------------------------------------------------------------------------


def pipeline_params(folder) -> dict:
    """{"unet", "autoencoder", "text_encoder"} parameters of a pipeline folder."""
    params, _ = convert.from_pipeline(folder)
    return params


def init_params(config):
    """The weights a run fine-tuned from the pipeline folder training.init_from starts from:
    its U-Net's, and its text encoder's too when training.train_text_encoder trains it."""
    folder = Path(config.training.init_from)
    params, _ = convert.from_diffusers(folder / "unet")
    if config.training.train_text_encoder:
        text, _ = convert.text_encoder_from_transformers(folder / "text_encoder")
        params = {"unet": params, "text_encoder": text}
    return params


def text_encoder_stamp(folder) -> list:
    """[path, size, mtime_ns] of the text encoder weights of `folder`
    (text_encoder/model.safetensors): what tells them apart without reading them."""
    path = (Path(folder) / "text_encoder" / "model.safetensors").resolve()
    return [str(path), *_size_and_time(path)]
