"""U-Net building blocks: timestep embedding, residual blocks, attention, resampling.

Submodule names follow diffusers' UNet2DModel (`resnets_0.conv1`, `attentions_0.to_q`, ...),
so importing published weights is a renaming plus transposes (see `convert.py`).
Activations are (B, H, W, C), NHWC.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axis names on kernels; `parallel.py` maps them onto mesh axes.
CONV_AXES = ("conv_height", "conv_width", "embed_in", "embed_out")
DENSE_AXES = ("embed_in", "embed_out")


def default_init(scale: float = 1.0):
    """DDPM's initializer: variance scaling over fan_avg, uniform; scale 0 gives zeros."""
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def conv(features, name, *, kernel=3, strides=1, padding="SAME", init_scale=1.0, dtype):
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_init(init_scale), CONV_AXES),
        name=name,
    )


def dense(features, name, *, init_scale=1.0, dtype):
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_init(init_scale), DENSE_AXES),
        name=name,
    )


def group_norm(name, *, groups, eps, dtype):
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name
    )


def timestep_embedding(t, dim: int, *, flip_sin_to_cos=False, freq_shift=1.0, max_period=1e4):
    """Sinusoidal embedding of integer timesteps (Vaswani et al.; Sec. B of Ho et al.).

    emb[:, i] = sin(t w_i), emb[:, half + i] = cos(t w_i), w_i = max_period^(-i / (half -
    freq_shift)), half = dim // 2. DDPM uses freq_shift=1 with sin first; improved DDPM
    uses freq_shift=0 with cos first (flip_sin_to_cos). t: (B,) -> (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> Dense -> swish -> Dense: (B,) -> (B, dim)."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        h = dense(self.dim, "linear_1", dtype=self.dtype)(features)
        return dense(self.dim, "linear_2", dtype=self.dtype)(nn.swish(h))


def upsample_nearest(x):
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")


def downsample_avg(x):
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class ResnetBlock(nn.Module):
    """The DDPM residual block, optionally with scale-shift norm and BigGAN resampling.

    h = conv1(swish(norm1(x))); h += time_emb_proj(swish(emb)) (or, with scale-shift norm,
    norm2(h) (1 + scale) + shift); h = conv2(dropout(swish(norm2(h)))); out = skip(x) + h,
    where skip is a 1x1 conv when the channel count changes. `resample="up"|"down"` resizes
    both paths after the first norm (improved DDPM's resblock_updown).
    """

    out_channels: int
    dropout: float = 0.0
    scale_shift_norm: bool = False
    resample: str | None = None
    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train: bool):
        norm = dict(groups=self.groups, eps=self.eps, dtype=self.dtype)
        h = nn.swish(group_norm("norm1", **norm)(x))
        if self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == "down":
            h, x = downsample_avg(h), downsample_avg(x)
        h = conv(self.out_channels, "conv1", dtype=self.dtype)(h)
        emb_channels = self.out_channels * (2 if self.scale_shift_norm else 1)
        emb_out = dense(emb_channels, "time_emb_proj", dtype=self.dtype)(nn.swish(emb))
        emb_out = emb_out[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = group_norm("norm2", **norm)(h) * (1.0 + scale) + shift
        else:
            h = group_norm("norm2", **norm)(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
        h = conv(self.out_channels, "conv2", init_scale=0.0, dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", kernel=1, padding=0, dtype=self.dtype)(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions with a residual connection (Sec. B of Ho et al.).

    out = x + to_out(softmax(q k^T / sqrt(d)) v) with q, k, v = to_q/k/v(group_norm(x)) split
    into heads of d channels (`num_heads`, or `head_channels` per head when > 0). `use_norm`
    False drops the group norm (diffusers' mid-block attention of scale-shift models).
    `use_dot_product_attention` calls `jax.nn.dot_product_attention`, which dispatches to a
    fused kernel on GPU; otherwise an einsum softmax.
    """

    num_heads: int = 1
    head_channels: int = -1
    groups: int = 32
    eps: float = 1e-6
    use_dot_product_attention: bool = True
    dtype: Dtype = jnp.float32
    use_norm: bool = True

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        heads = c // self.head_channels if self.head_channels > 0 else self.num_heads
        if c % heads:
            raise ValueError(f"model attention: {c} channels do not split into {heads} heads")
        h = x
        if self.use_norm:
            h = group_norm("group_norm", groups=self.groups, eps=self.eps, dtype=self.dtype)(h)
        h = h.reshape(b, hgt * wid, c)
        q, k, v = (
            dense(c, name, dtype=self.dtype)(h).reshape(b, hgt * wid, heads, c // heads)
            for name in ("to_q", "to_k", "to_v")
        )
        if self.use_dot_product_attention:
            a = jax.nn.dot_product_attention(q, k, v)
        else:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // heads)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
            a = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        a = a.reshape(b, hgt * wid, c)
        out = dense(c, "to_out_0", init_scale=0.0, dtype=self.dtype)(a)
        return x + out.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. padding 0 is TensorFlow's SAME (pad right/bottom, as DDPM), 1 pads
    one pixel on each side (improved DDPM / PyTorch)."""

    channels: int
    padding: int = 0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = "SAME" if self.padding == 0 else ((self.padding, self.padding),) * 2
        return conv(self.channels, "conv", strides=2, padding=pad, dtype=self.dtype)(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.channels, "conv", dtype=self.dtype)(upsample_nearest(x))
