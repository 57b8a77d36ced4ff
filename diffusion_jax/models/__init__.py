"""Flax models: the U-Net, the KL autoencoder, CLIP's text encoder, and their construction
from a config."""

import jax.numpy as jnp

from diffusion_jax.config import model_input_shape
from diffusion_jax.models.autoencoder import (
    AutoencoderKL,
    create_autoencoder,
    downsampling_factor,
)
from diffusion_jax.models.convert import from_diffusers, to_diffusers
from diffusion_jax.models.text_encoder import CLIPTextEncoder
from diffusion_jax.models.unet import UNet


def create_unet(config) -> UNet:
    """The U-Net described by `config.model` for the model input of `model_input_shape`
    (images, or latents in a latent run). `model.learn_sigma` doubles the output channels
    (mean and variance outputs)."""
    m = config.model
    _, channels = model_input_shape(config)
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        out_channels=channels * (2 if m.learn_sigma else 1),
        num_classes=config.data.num_classes if m.class_conditional else 0,
        num_heads=m.num_heads,
        head_channels=m.head_channels,
        scale_shift_norm=m.scale_shift_norm,
        resblock_updown=m.resblock_updown,
        downsample_padding=m.downsample_padding,
        flip_sin_to_cos=m.flip_sin_to_cos,
        freq_shift=m.freq_shift,
        norm_groups=m.norm_groups,
        norm_eps=m.norm_eps,
        use_dot_product_attention=m.attention == "dot_product_attention",
        mid_attn_norm=m.mid_attn_norm,
        remat=m.remat,
        context_dim=m.context_dim,
        context_source=m.context_source,
        transformer_depth=m.transformer_depth,
        linear_projection=m.linear_projection,
        dtype=jnp.dtype(m.dtype),
    )


def create_model(config):
    """The network `config.training.objective` trains: the U-Net, or the autoencoder."""
    if config.training.objective == "autoencoder":
        return create_autoencoder(config)
    return create_unet(config)


def create_text_encoder(config) -> CLIPTextEncoder:
    te = config.text_encoder
    return CLIPTextEncoder(
        vocab_size=te.vocab_size,
        width=te.width,
        num_layers=te.num_layers,
        num_heads=te.num_heads,
        mlp_dim=te.mlp_dim,
        max_length=te.max_length,
        activation=te.activation,
        eps=te.eps,
    )


def init_inputs(config, batch: int = 1) -> tuple:
    """Example positional inputs of `create_model(config)`, for init and shape evaluation."""
    d = config.data
    if config.training.objective == "autoencoder":
        a = config.autoencoder
        latent = d.image_size // downsampling_factor(a.ch_mult)
        return (
            jnp.zeros((batch, d.image_size, d.image_size, d.channels)),
            jnp.zeros((batch, latent, latent, a.latent_channels)),
        )
    size, channels = model_input_shape(config)
    labels = jnp.zeros((batch,), jnp.int32) if config.model.class_conditional else None
    return jnp.zeros((batch, size, size, channels)), jnp.zeros((batch,), jnp.int32), labels


__all__ = [
    "AutoencoderKL",
    "CLIPTextEncoder",
    "UNet",
    "create_autoencoder",
    "create_model",
    "create_text_encoder",
    "create_unet",
    "from_diffusers",
    "init_inputs",
    "to_diffusers",
]
