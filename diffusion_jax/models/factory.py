"""Networks built from a run config, their example inputs, and their parameter shapes.

`create_model` builds the denoising network of `config.model` (`create_unet` or
`create_dit`, by model.arch; with the text encoder when that trains too),
`create_text_encoder` CLIP's text encoder of `config.text_encoder`; `init_inputs` gives the
denoiser's example inputs and `abstract_params` the parameter shapes of any model for given
example inputs, without allocating the parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.config import model_input_shape
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.text_denoiser import TextTrainedDenoiser
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


def create_dit(config) -> DiT:
    """The DiT described by `config.model.dit` for the model input of `model_input_shape`.
    `model.learn_sigma` doubles the output channels; the label table gets its null row when
    training drops labels (training.cond_drop_prob > 0), as in the original."""
    m, dt = config.model, config.model.dit
    _, channels = model_input_shape(config)
    return DiT(
        patch_size=dt.patch_size,
        hidden_size=dt.hidden_size,
        depth=dt.depth,
        num_heads=dt.num_heads,
        mlp_ratio=dt.mlp_ratio,
        out_channels=channels * (2 if m.learn_sigma else 1),
        num_classes=config.data.num_classes if m.class_conditional else 0,
        null_class=config.training.cond_drop_prob > 0,
        per_block_embedders=dt.per_block_embedders,
        freq_shift=dt.freq_shift,
        mlp_norm_eps=dt.mlp_norm_eps,
        dropout=m.dropout,
        use_dot_product_attention=m.attention == "dot_product_attention",
        remat=m.remat,
        dtype=jnp.dtype(m.dtype),
    )


ARCHS = {"unet": create_unet, "dit": create_dit}


def create_model(config) -> UNet | DiT | TextTrainedDenoiser:
    """The denoising network of `config.model` (model.arch: the U-Net or the DiT), whatever
    training.objective says: the network of an autoencoder run is `create_autoencoder`, and
    `objectives.for_config` picks between the two. With training.train_text_encoder it is
    trained together with the text encoder of `config.text_encoder` (`TextTrainedDenoiser`)."""
    denoiser = ARCHS[config.model.arch](config)
    if config.training.train_text_encoder:
        return TextTrainedDenoiser(unet=denoiser, text_encoder=create_text_encoder(config))
    return denoiser


def create_text_encoder(config) -> CLIPTextEncoder:
    """CLIP's text encoder described by `config.text_encoder`: tokens (B, L) -> (B, L, width)."""
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
    """Example positional inputs (x, t, labels) of the network of `create_model(config)`, for
    init and shape evaluation: x (B, S, S, C) zeros for (S, C) = `model_input_shape(config)`,
    t (B,) int32 zeros, labels (B,) int32 zeros for a class-conditional model, else None."""
    size, channels = model_input_shape(config)
    labels = jnp.zeros((batch,), jnp.int32) if config.model.class_conditional else None
    return jnp.zeros((batch, size, size, channels)), jnp.zeros((batch,), jnp.int32), labels


def abstract_params(model: nn.Module, *inputs, boxed: bool = False):
    """The "params" collection `model.init(key, *inputs)` would make, as a tree of
    jax.ShapeDtypeStruct: shapes without allocating (or computing) the parameters.

    Unboxed by default; `boxed=True` keeps flax's LogicallyPartitioned boxes, which carry the
    logical axis names a caller needs to shard the parameters.
    """
    shapes = jax.eval_shape(lambda k: model.init(k, *inputs), jax.random.key(0))["params"]
    return shapes if boxed else nn.unbox(shapes)
