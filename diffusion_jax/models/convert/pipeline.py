"""A whole Stable Diffusion style diffusers pipeline folder: its U-Net, VAE and text encoder
together, with one config describing them; a run fine-tuned from one, and its export back
to a pipeline folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
from safetensors.numpy import save_file

from diffusion_jax import config as config_lib
from diffusion_jax.models.autoencoder import downsampling_factor
from diffusion_jax.models.convert import autoencoder, layout, scheduler, text_encoder, unet

# Fields of the model section a fine-tuning run keeps from its own config: how it computes,
# not what the network is.
RUN_MODEL_FIELDS = ("dtype", "remat", "attention", "dropout")
# Sections of the user's config kept over a pipeline folder's description in text-to-image.
RUN_SECTIONS = ("sampling", "training", "mesh", "eval")
# Fields of the diffusion section a pipeline folder describes (the rest is the training loss).
SCHEDULE_FIELDS = ("schedule", "num_timesteps", "beta_start", "beta_end", "prediction", "variance")


def _read_config(path: Path, what: str) -> dict:
    return json.loads(layout.require_file(path, what).read_text())


def describe_pipeline(folder) -> ml_collections.ConfigDict:
    """The config of a pipeline folder, from its config.json files alone (no weights): model
    and diffusion (unet/, scheduler/), autoencoder (vae/), text_encoder (text_encoder/), and
    data.image_size, the decoded image size (the U-Net works on the VAE's latents)."""
    folder = Path(folder)
    layout.require_file(folder / "model_index.json", "a diffusers pipeline folder?")
    config = unet.model_config_from_diffusers(
        _read_config(folder / "unet" / "config.json", "a UNet2DConditionModel folder?"),
        layout.read_json(folder / "scheduler" / "scheduler_config.json"),
    )
    ae_fields = autoencoder.autoencoder_fields_from_diffusers(
        _read_config(folder / "vae" / "config.json", "an AutoencoderKL folder?")
    )
    te_fields = text_encoder.text_encoder_fields(
        _read_config(folder / "text_encoder" / "config.json", "a CLIPTextModel folder?")
    )
    config.data.image_size *= downsampling_factor(ae_fields["ch_mult"])
    config.data.channels = ae_fields.pop("image_channels")
    config.autoencoder.update(ae_fields)
    config.text_encoder.update(te_fields)
    config.pretrained = str(folder)
    return config


def from_pipeline(folder) -> tuple[dict, ml_collections.ConfigDict]:
    """A Stable Diffusion style pipeline folder (unet/, vae/, text_encoder/, scheduler/) as
    ({"unet", "autoencoder", "text_encoder"} params, a config whose model, diffusion,
    autoencoder and text_encoder sections describe it, `describe_pipeline`)."""
    folder = Path(folder)
    config = describe_pipeline(folder)
    unet_params, _ = unet.from_diffusers(folder / "unet")
    vae, _ = autoencoder.autoencoder_from_diffusers(folder / "vae")
    text, _ = text_encoder.text_encoder_from_transformers(folder / "text_encoder")
    return {"unet": unet_params, "autoencoder": vae, "text_encoder": text}, config


def finetune_config(config) -> ml_collections.ConfigDict:
    """`config` as a run fine-tuned from the pipeline folder training.init_from (unchanged
    without one): the folder describes the network (model, except how it computes:
    RUN_MODEL_FIELDS), the schedule (SCHEDULE_FIELDS), the autoencoder and the text encoder,
    and the image size (the pipeline's resolution; images are cropped and resized to it);
    autoencoder.weights is its vae/ and text_encoder.weights the folder, which encode the
    images and their captions once (--mode=encode); the sampling fields left unset follow
    its scheduler config. Everything else stays the config's."""
    source = config.training.init_from
    if not source:
        return config
    found = describe_pipeline(source)
    merged = ml_collections.ConfigDict(config.to_dict())
    model = ml_collections.ConfigDict(found.model.to_dict())
    for key in RUN_MODEL_FIELDS:
        model[key] = config.model[key]
    model.context_length = found.text_encoder.max_length
    merged.model = model
    for key in SCHEDULE_FIELDS:
        merged.diffusion[key] = found.diffusion[key]
    merged.autoencoder = ml_collections.ConfigDict(
        {**config.autoencoder.to_dict(), **found.autoencoder.to_dict()}
    )
    merged.autoencoder.weights = str(Path(source) / "vae")
    merged.text_encoder = ml_collections.ConfigDict(found.text_encoder.to_dict())
    merged.text_encoder.weights = str(source)
    merged.data.image_size, merged.data.channels = found.data.image_size, found.data.channels
    # Pictures, evaluation and samples follow the folder's scheduler rules, as it would.
    merged.sampling = pipeline_sampling(merged, source)
    return merged


def text_to_image_config(config) -> ml_collections.ConfigDict:
    """The config of text-to-image sampling from the pipeline folder config.pretrained: the
    folder's model, diffusion, autoencoder and text encoder (`describe_pipeline`) under the
    user's RUN_SECTIONS; the sampling fields left unset follow the folder's scheduler config."""
    merged = ml_collections.ConfigDict(describe_pipeline(config.pretrained).to_dict())
    for section in RUN_SECTIONS:
        merged[section] = ml_collections.ConfigDict(config[section].to_dict())
    merged.sampling = pipeline_sampling(merged, config.pretrained)
    return merged


def pipeline_sampling(config, folder) -> ml_collections.ConfigDict:
    """config.sampling resolved against the scheduler config of the pipeline `folder`
    (`scheduler.sampling_from_scheduler`): the fields it leaves unset take the folder's."""
    implied = scheduler.sampling_from_scheduler(
        scheduler.read_scheduler_config(folder), config.sampling.sampler
    )
    return config_lib.resolved_sampling(config, implied)


def to_pipeline(unet_params, folder, source, text_encoder_params=None) -> Path:
    """Writes a diffusers pipeline folder: the pipeline folder `source` with its U-Net's
    weights replaced by `unet_params`, and its text encoder's by `text_encoder_params` when
    given (each config.json as the source has it: fine-tuning changes no architecture).
    Returns `folder`."""
    folder, source = Path(folder), Path(source)
    layout.require_file(source / "model_index.json", "a diffusers pipeline folder?")
    if folder.exists():
        shutil.rmtree(folder)
    replaced = {"unet": (unet_params, layout.WEIGHTS_FILE)}
    if text_encoder_params is not None:
        replaced["text_encoder"] = (text_encoder_params, text_encoder.TEXT_ENCODER_FILE)
    # Every other component (vae/, tokenizer/, scheduler/, ...) as it was.
    shutil.copytree(
        source, folder, ignore=lambda d, names: list(replaced) if Path(d) == source else []
    )
    for part, (params, weights_file) in replaced.items():
        (folder / part).mkdir()
        shutil.copy2(source / part / "config.json", folder / part / "config.json")
        # The text model's tensors named as the source names them (transformers 4 and 5
        # differ); diffusers' U-Net has no prefix.
        prefix = text_encoder.tensor_prefix(source / part) if part == "text_encoder" else ""
        save_file(layout.torch_tensors(params, prefix=prefix), str(folder / part / weights_file))
    return folder
