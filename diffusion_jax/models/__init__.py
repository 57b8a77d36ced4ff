"""Flax models: the U-Net and its construction from a config."""

from diffusion_jax.models.convert import from_diffusers, to_diffusers
from diffusion_jax.models.unet import UNet


def create_model(config) -> UNet:
    """The U-Net described by `config.model` for images of `config.data.channels` channels.

    `model.learn_sigma` doubles the output channels (mean and variance outputs).
    """
    m = config.model
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        out_channels=config.data.channels * (2 if m.learn_sigma else 1),
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
        dtype={"float32": "float32", "bfloat16": "bfloat16"}[m.dtype],
    )


__all__ = ["UNet", "create_model", "from_diffusers", "to_diffusers"]
