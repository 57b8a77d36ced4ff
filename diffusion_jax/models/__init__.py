"""Flax models: the U-Net, the DiT, the KL autoencoder, CLIP's text encoder, and their
construction from a config."""

from diffusion_jax.models.autoencoder import AutoencoderKL, create_autoencoder
from diffusion_jax.models.convert import from_diffusers, to_diffusers
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.factory import (
    abstract_params,
    create_dit,
    create_model,
    create_text_encoder,
    create_unet,
    init_inputs,
)
from diffusion_jax.models.text_encoder import CLIPTextEncoder
from diffusion_jax.models.unet import UNet

__all__ = [
    "AutoencoderKL",
    "CLIPTextEncoder",
    "DiT",
    "UNet",
    "abstract_params",
    "create_autoencoder",
    "create_dit",
    "create_model",
    "create_text_encoder",
    "create_unet",
    "from_diffusers",
    "init_inputs",
    "to_diffusers",
]
