"""Pre-flight of the files a config names and of its data: present, readable and of their
format (read as far as the format shows: a header, a statistics file, a parameters file),
each problem one line naming the field and the path. Nothing here writes."""

from __future__ import annotations

import os
from pathlib import Path

from diffusion_jax import config as config_lib
from diffusion_jax import export, paths
from diffusion_jax.data import folder, pipeline
from diffusion_jax.errors import ConfigError, first_line


def check_data(config, split: str) -> None:
    """The data of `split` can be read: a tfds data set is prepared (or data.download is on),
    an image folder holds images. Latent shards are checked (and made) by the run."""
    d = config.data
    if (
        config_lib.is_latent(config)
        and d.latents
        and (paths.path(d.latents) / f"{split}-meta.json").exists()
    ):
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
    """autoencoder.weights loads and matches config.autoencoder (`weights.load_autoencoder`,
    which keeps what it read for the run)."""
    from diffusion_jax.weights import load_autoencoder

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
