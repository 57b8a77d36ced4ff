"""A whole Stable Diffusion style diffusers pipeline folder: its U-Net, VAE and text encoder
together, with one config describing them."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from diffusion_jax.models.autoencoder import downsampling_factor
from diffusion_jax.models.convert import autoencoder, layout, text_encoder, unet


def from_pipeline(folder) -> tuple[dict, ml_collections.ConfigDict]:
    """A Stable Diffusion style pipeline folder (unet/, vae/, text_encoder/, scheduler/) as
    ({"unet", "autoencoder", "text_encoder"} params, a config whose model, diffusion,
    autoencoder and text_encoder sections describe it). The U-Net works on latents of the
    VAE; data.image_size is the decoded image size."""
    folder = Path(folder)
    layout.require_file(folder / "model_index.json", "a diffusers pipeline folder?")
    unet_params, config = unet.from_diffusers(folder / "unet")
    vae, ae_fields = autoencoder.autoencoder_from_diffusers(folder / "vae")
    text, te_fields = text_encoder.text_encoder_from_transformers(folder / "text_encoder")
    # The U-Net's config.json gives the latent size; the data section describes images.
    latent_size = config.data.image_size
    config.data.image_size = latent_size * downsampling_factor(ae_fields["ch_mult"])
    config.data.channels = ae_fields.pop("image_channels")
    config.autoencoder.update(ae_fields)
    config.text_encoder.update(te_fields)
    config.pretrained = str(folder)
    config.sampling.clip_denoised = False
    return {"unet": unet_params, "autoencoder": vae, "text_encoder": text}, config
