"""One loader for diffusers folders: `from_diffusers(folder)` reads the folder's
`_class_name` (model_index.json for a pipeline, else config.json) and hands it to its family's
importer; `model_config_from_diffusers(cfg)` does the same for a config alone. A class no
importer reads is one line naming it and the classes that are read."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from diffusion_jax.models.convert import dit, layout, pipeline, unet

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
PIPELINE_CLASSES = ("StableDiffusionPipeline", "DiTPipeline")


def _class_of(cfg: dict | None, where: Path) -> str:
    if cfg is None:
        raise FileNotFoundError(f"{where} does not exist (a diffusers folder?)")
    return str(cfg.get("_class_name", ""))


def _unknown(name: str, where: Path, known) -> ValueError:
    return ValueError(
        f"{where}: _class_name {name!r} is not a model this reads; it reads {', '.join(known)}"
    )


def from_diffusers(folder) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, run config) of a diffusers folder, by its `_class_name`: a UNet2DModel or
    UNet2DConditionModel (`unet.from_diffusers`), a DiTTransformer2DModel or the Hub's older
    Transformer2DModel DiT config (`dit.from_diffusers`), a DiTPipeline folder (its
    transformer and VAE), or a Stable Diffusion pipeline folder (`pipeline.from_pipeline`:
    {"unet", "autoencoder", "text_encoder"} params). AutoencoderKL folders have their own
    reader, `autoencoder_from_diffusers` (an autoencoder is no run of its own)."""
    folder = Path(folder)
    index = layout.read_json(folder / "model_index.json")
    if index is not None:
        name = _class_of(index, folder / "model_index.json")
        if name == "DiTPipeline":
            return dit.from_diffusers(folder)
        if (folder / "unet" / "config.json").exists():
            return pipeline.from_pipeline(folder)
        raise _unknown(name, folder / "model_index.json", PIPELINE_CLASSES)
    name = _class_of(layout.read_json(folder / "config.json"), folder / "config.json")
    if name in UNET_CLASSES:
        return unet.from_diffusers(folder)
    if name in dit.TRANSFORMER_CLASSES:
        return dit.from_diffusers(folder)
    if name == "AutoencoderKL":
        raise ValueError(
            f"{folder}: an AutoencoderKL; read it with convert.autoencoder_from_diffusers, or "
            "name it in config.autoencoder.weights"
        )
    known = UNET_CLASSES + dit.TRANSFORMER_CLASSES + PIPELINE_CLASSES
    raise _unknown(name, folder / "config.json", known)


def model_config_from_diffusers(cfg: dict, scheduler: dict | None = None):
    """The run config that describes the network of a diffusers config.json (`cfg`), by
    its `_class_name`: a U-Net's (`unet.model_config_from_diffusers`) or a DiT's
    (`dit.config_from_diffusers`)."""
    name = str(cfg.get("_class_name", ""))
    if name in dit.TRANSFORMER_CLASSES:
        return dit.config_from_diffusers(cfg, scheduler)
    if name in UNET_CLASSES or not name:  # a config without its class: a U-Net, as before
        return unet.model_config_from_diffusers(cfg, scheduler)
    raise _unknown(name, Path("config.json"), UNET_CLASSES + dit.TRANSFORMER_CLASSES)
