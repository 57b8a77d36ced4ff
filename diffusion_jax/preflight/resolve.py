"""The run config, resolved once: `resolve(config, workdir, mode)` is what every job runs.

In order: a run fine-tuned from a pipeline folder (training.init_from) takes the folder's
network, schedule, autoencoder and text encoder over its own run settings; text-to-image
sampling from a pipeline folder (config.pretrained, --mode=sample) takes the folder's model
under the user's sampling, training, mesh and eval sections; a latent run that trains or
encodes has data.latents located; the fields a workdir's config.json decides
(FROM_WORKDIR: the EMA widths its checkpoints track) come from it when the command leaves
them unset, so that eval, sample, export and post-hoc EMA need no training flags again;
the sampling fields left unset follow the folder's
scheduler config; then the whole is validated with this job's devices. The folder is checked
before it is read, so a broken one is one line. Jobs take the result as it is: none of them
validates or rewrites it.
"""

from __future__ import annotations

import json
import logging

import jax
import ml_collections

from diffusion_jax import config as config_lib
from diffusion_jax import paths, validation
from diffusion_jax.data import latents
from diffusion_jax.errors import ConfigError, first_line
from diffusion_jax.models import convert
from diffusion_jax.preflight.files import check_pipeline
from diffusion_jax.preflight.workdir import check_reachable

log = logging.getLogger(__name__)

# Fields a workdir's config.json decides for every later command on it, when the command
# leaves them at base_config's value: the EMA widths its checkpoints track (all modes), and
# how often a resumed run snapshots them (train).
FROM_WORKDIR = {
    ("optim", "ema_sigma_rels"): ("train", "eval", "sample", "export", "posthoc_ema"),
    ("training", "ema_snapshot_every"): ("train",),
}


def resolve(config, workdir, mode: str, num_devices: int | None = None):
    """The resolved run config of `mode` (module doc); `num_devices` defaults to this job's."""
    if workdir is not None:
        check_reachable(workdir)
    config = _fetched(config)
    if config.training.init_from:
        config = _merged(convert.finetune_config, config, "training.init_from")
    if mode == "sample" and config.pretrained:
        config = _merged(convert.text_to_image_config, config, "pretrained")
    if workdir is not None:
        config = _from_workdir(config, paths.path(workdir), mode)
    if mode in ("train", "encode") and config_lib.is_latent(config):
        config = latents.with_latents_dir(config, workdir)
    validation.validate(config, jax.device_count() if num_devices is None else num_devices)
    return config


# Files and folders a config names that are read by libraries that need local files
# (safetensors, tokenizers, PIL, torch pickles): in a bucket, they are read from a local copy.
FETCHED = (
    ("pretrained",),
    ("training", "init_from"),
    ("text_encoder", "weights"),
    ("autoencoder", "weights"),
    ("eval", "params_file"),
    ("eval", "inception_weights"),
    ("eval", "reference_stats"),
    ("data", "data_dir"),
)


def _fetched(config):
    """`config` with each FETCHED field that names an object in a bucket replaced by its
    local copy (`paths.local`), logged. An autoencoder run's workdir and a tfds data_dir stay
    remote: orbax and tfds read buckets themselves."""
    fetched = {}
    for field in FETCHED:
        value = config
        for key in field:
            value = value[key]
        if not value or not paths.is_remote(value):
            continue
        if field == ("autoencoder", "weights") and (paths.path(value) / "checkpoints").exists():
            continue  # an autoencoder run's workdir: orbax reads its checkpoints in place
        if field == ("data", "data_dir") and config.data.dataset != "folder":
            continue
        name = "config." + ".".join(field)
        try:
            copy = paths.local(value)
            if field == ("eval", "params_file"):  # its config, beside it
                paths.local(paths.path(value).with_suffix(".json"))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name}={value}: no such file or folder") from e
        except Exception as e:  # noqa: BLE001 - no network, no credentials
            raise ConfigError(f"{name}={value}: cannot read it ({first_line(e)})") from e
        fetched[field] = str(copy)
        log.info("%s=%s: read from its local copy %s", name, value, copy)
    if not fetched:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    for field, value in fetched.items():
        section = config
        for key in field[:-1]:
            section = section[key]
        section[field[-1]] = value
    return config


def _from_workdir(config, workdir, mode: str):
    """`config` with the FROM_WORKDIR fields it leaves unset taken from workdir/config.json,
    each one logged; a field set to another value is left for pre-flight to refuse."""
    path = workdir / "config.json"
    if not path.is_file():
        return config
    saved, base = json.loads(path.read_text()), config_lib.base_config()
    taken = {}
    for (section, key), modes in FROM_WORKDIR.items():
        value = saved.get(section, {}).get(key)
        unset = _same(config[section][key], base[section][key])
        if mode in modes and unset and value is not None and not _same(value, base[section][key]):
            taken[(section, key)] = tuple(value) if isinstance(value, list) else value
    if not taken:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    for (section, key), value in taken.items():
        config[section][key] = value
        log.info("config.%s.%s=%s, from %s", section, key, value, path)
    return config


def _same(a, b) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return tuple(a) == tuple(b)
    return a == b


def _merged(merge, config, field: str):
    """`merge(config)` once the pipeline folder of config.<field> is checked; what it finds
    wrong in the folder is one line naming the field."""
    source = config.training.init_from if field == "training.init_from" else config.pretrained
    check_pipeline(source, f"config.{field}")
    try:
        return merge(config)
    except ValueError as e:
        raise ConfigError(f"config.{field}={source}: {first_line(e)}") from e
