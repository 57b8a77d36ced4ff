"""The DDPM U-Net (Ho et al. 2020, App. B) with the options of improved/guided diffusion."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any


class UNet(nn.Module):
    """Noise-prediction U-Net: (x_t (B, H, W, C), t (B,), labels (B,) | None) -> (B, H, W, C_out).

    Levels i = 0..len(ch_mult)-1 run at resolution H / 2^i with ch * ch_mult[i] channels and
    `num_res_blocks` residual blocks (plus attention where the resolution is in
    `attn_resolutions`); the decoder mirrors it with one more block per level fed by the skip
    connections. Class conditioning adds an embedding of the label to the time embedding;
    label `num_classes` is the "null" label used when `labels` is None (classifier-free
    guidance). The output is float32 whatever `dtype` the activations use.

    With `context_dim > 0` the attention blocks are latent diffusion's spatial transformers,
    cross-attending to a context sequence (B, M, context_dim): precomputed text embeddings
    passed as `context` (`context_source="text"`; None means the null context, zeros), or
    a learned embedding of the class label as a one-token context (`context_source="class"`,
    the label then does not enter the time embedding). This is diffusers'
    UNet2DConditionModel layout (Stable Diffusion v1/v2).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    out_channels: int = 3
    num_classes: int = 0
    num_heads: int = 1
    head_channels: int = -1
    scale_shift_norm: bool = False
    resblock_updown: bool = False
    downsample_padding: int = 0
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    norm_groups: int = 32
    norm_eps: float = 1e-6
    use_dot_product_attention: bool = True
    mid_attn_norm: bool = True
    remat: bool = False
    context_dim: int = 0
    context_source: str = "text"
    transformer_depth: int = 1
    linear_projection: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, labels=None, train: bool = False, context=None):
        dtype = self.dtype
        resnet_cls = (
            nn.remat(layers.ResnetBlock, static_argnums=(3,))
            if self.remat
            else (layers.ResnetBlock)
        )

        def resnet(out_channels, name, resample=None):
            return resnet_cls(
                out_channels,
                self.dropout,
                self.scale_shift_norm,
                resample,
                self.norm_groups,
                self.norm_eps,
                dtype,
                name=name,
            )

        def attention(name, use_norm=True):
            if self.context_dim > 0:

                def transformer(h):
                    channels = h.shape[-1]
                    heads = (
                        channels // self.head_channels if self.head_channels > 0 else self.num_heads
                    )
                    return layers.SpatialTransformer(
                        heads,
                        self.transformer_depth,
                        self.linear_projection,
                        self.norm_groups,
                        1e-6,
                        self.use_dot_product_attention,
                        dtype,
                        name=name,
                    )(h, context)

                return transformer
            return layers.AttentionBlock(
                self.num_heads,
                self.head_channels,
                self.norm_groups,
                self.norm_eps,
                self.use_dot_product_attention,
                dtype,
                use_norm,
                name=name,
            )

        emb_dim = 4 * self.ch
        emb = layers.timestep_embedding(
            t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        emb = layers.TimestepEmbedding(emb_dim, dtype, name="time_embedding")(emb.astype(dtype))
        class_context = self.context_dim > 0 and self.context_source == "class"
        if self.num_classes > 0 and labels is None:
            labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
        if class_context and self.num_classes > 0:
            context = nn.Embed(
                self.num_classes + 1,
                self.context_dim,
                dtype=dtype,
                param_dtype=jnp.float32,
                name="class_context",
            )(labels)[:, None, :]
        elif self.context_dim > 0 and context is None:
            # Keys and values carry no bias, so a zero context contributes only to_out's bias
            # whatever its length: one token suffices.
            context = jnp.zeros((x.shape[0], 1, self.context_dim), dtype)
        if self.num_classes > 0 and not class_context:
            emb = emb + nn.Embed(
                self.num_classes + 1,
                emb_dim,
                dtype=dtype,
                param_dtype=jnp.float32,
                name="class_embedding",
            )(labels)

        h = layers.conv(self.ch, "conv_in", dtype=dtype)(x.astype(dtype))
        skips = [h]
        resolution = x.shape[1]
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            prefix = f"down_blocks_{level}"
            for block in range(self.num_res_blocks):
                h = resnet(self.ch * mult, f"{prefix}.resnets_{block}")(h, emb, train)
                if resolution in self.attn_resolutions:
                    h = attention(f"{prefix}.attentions_{block}")(h)
                skips.append(h)
            if level != last:
                name = f"{prefix}.downsamplers_0"
                if self.resblock_updown:
                    h = resnet(h.shape[-1], name, resample="down")(h, emb, train)
                else:
                    h = layers.Downsample(h.shape[-1], self.downsample_padding, dtype, name=name)(h)
                resolution //= 2
                skips.append(h)

        h = resnet(h.shape[-1], "mid_block.resnets_0")(h, emb, train)
        h = attention("mid_block.attentions_0", self.mid_attn_norm)(h)
        h = resnet(h.shape[-1], "mid_block.resnets_1")(h, emb, train)

        for up, mult in enumerate(reversed(self.ch_mult)):
            prefix = f"up_blocks_{up}"
            for block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resnet(self.ch * mult, f"{prefix}.resnets_{block}")(h, emb, train)
                if resolution in self.attn_resolutions:
                    h = attention(f"{prefix}.attentions_{block}")(h)
            if up != last:
                name = f"{prefix}.upsamplers_0"
                if self.resblock_updown:
                    h = resnet(h.shape[-1], name, resample="up")(h, emb, train)
                else:
                    h = layers.Upsample(h.shape[-1], dtype, name=name)(h)
                resolution *= 2
        assert not skips

        h = nn.swish(
            layers.group_norm(
                "conv_norm_out", groups=self.norm_groups, eps=self.norm_eps, dtype=dtype
            )(h)
        )
        h = layers.conv(self.out_channels, "conv_out", init_scale=0.0, dtype=dtype)(h)
        return h.astype(jnp.float32)
