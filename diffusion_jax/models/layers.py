"""U-Net building blocks: timestep embedding, residual blocks, attention, resampling.

Submodule names follow diffusers' UNet2DModel (`resnets_0.conv1`, `attentions_0.to_q`, ...),
so importing published weights is a renaming plus transposes (see `convert/unet.py`).
Activations are (B, H, W, C), NHWC.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axis names on kernels; `parallel.py` maps them onto mesh axes. They decide only
# where parameters live, never their names or values. The projections into and out of
# attention heads and MLP hidden units carry "heads" / "mlp", which split over 'tensor'.
CONV_AXES = ("conv_height", "conv_width", "embed_in", "embed_out")
DENSE_AXES = ("embed_in", "embed_out")
QKV_AXES, ATTN_OUT_AXES = ("embed", "heads"), ("heads", "embed")
MLP_IN_AXES, MLP_OUT_AXES = ("embed", "mlp"), ("mlp", "embed")


def default_init(scale: float = 1.0):
    """DDPM's initializer: variance scaling over fan_avg, uniform; scale 0 gives zeros."""
    if scale == 0.0:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


class PointwiseConv(nn.Module):
    """A 1x1 convolution computed as a matmul over channels: (..., C_in) -> (..., features).

    Its parameters are nn.Conv's (kernel (1, 1, C_in, features), bias), so checkpoints and
    weight imports do not see the difference; XLA:CPU runs the matmul about twice as fast as
    the convolution, forward and backward."""

    features: int
    kernel_init: Any
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (1, 1, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        y = jnp.einsum("...c,cd->...d", x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        return y + bias.astype(self.dtype)


def conv(features, name, *, kernel=3, strides=1, padding="SAME", init_scale=1.0, dtype):
    kernel_init = nn.with_logical_partitioning(default_init(init_scale), CONV_AXES)
    if kernel == 1 and strides == 1:
        return PointwiseConv(features, kernel_init, dtype=dtype, name=name)
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        name=name,
    )


def dense(features, name, *, init_scale=1.0, dtype, axes=DENSE_AXES, use_bias=True):
    """nn.Dense with DDPM's initializer and logical `axes` on its kernel; a bias along "heads"
    or "mlp" is named so too (it splits like the kernel's outputs)."""
    bias_init = nn.initializers.zeros_init()
    if axes[-1] in ("heads", "mlp"):
        bias_init = nn.with_logical_partitioning(bias_init, axes[-1:])
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(default_init(init_scale), axes),
        bias_init=bias_init,
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
    both paths after the first norm (improved DDPM's resblock_updown). `emb=None` drops the
    time embedding and its projection (the autoencoder's blocks).
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
        if emb is None:
            return self._finish(x, group_norm("norm2", **norm)(h), train)
        emb_channels = self.out_channels * (2 if self.scale_shift_norm else 1)
        emb_out = dense(emb_channels, "time_emb_proj", dtype=self.dtype)(nn.swish(emb))
        emb_out = emb_out[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = group_norm("norm2", **norm)(h) * (1.0 + scale) + shift
        else:
            h = group_norm("norm2", **norm)(h + emb_out)
        return self._finish(x, h, train)

    def _finish(self, x, h, train):
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
        h = conv(self.out_channels, "conv2", init_scale=0.0, dtype=self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", kernel=1, padding=0, dtype=self.dtype)(x)
        return x + h


def multi_head_attention(q, k, v, use_dot_product_attention: bool = True, *, causal=False):
    """softmax(q k^T / sqrt(d)) v per head. q: (B, Lq, heads, d), k, v: (B, Lk, heads, d) ->
    (B, Lq, heads, d). `jax.nn.dot_product_attention` dispatches to a fused kernel on GPU;
    the einsum form is the reference it is benchmarked against. Both take the logits and
    the softmax in float32 (diffusers' upcast_attention, always on)."""
    if use_dot_product_attention:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    # Logits in float32 whatever the activations' dtype, as dot_product_attention computes
    # them (and diffusers' upcast_attention asks: Stable Diffusion 2.x overflows in float16).
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(q.shape[-1])
    if causal:
        mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


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
            dense(c, name, dtype=self.dtype, axes=QKV_AXES)(h).reshape(
                b, hgt * wid, heads, c // heads
            )
            for name in ("to_q", "to_k", "to_v")
        )
        a = multi_head_attention(q, k, v, self.use_dot_product_attention)
        a = a.reshape(b, hgt * wid, c)
        out = dense(c, "to_out_0", init_scale=0.0, dtype=self.dtype, axes=ATTN_OUT_AXES)(a)
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


def layer_norm(name, *, eps=1e-5, dtype):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name)


class CrossAttention(nn.Module):
    """Multi-head attention of a sequence x (B, L, C) to `context` (B, M, D), or to itself
    when context is None: to_out(attention(to_q(x), to_k(ctx), to_v(ctx))), with no biases on
    q, k, v (diffusers' Attention as used by Stable Diffusion)."""

    num_heads: int
    use_dot_product_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        b, length, c = x.shape
        context = x if context is None else context.astype(self.dtype)
        heads, head_dim = self.num_heads, c // self.num_heads

        def project(name, inputs):
            out = dense(c, name, dtype=self.dtype, axes=QKV_AXES, use_bias=False)(inputs)
            return out.reshape(b, inputs.shape[1], heads, head_dim)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        a = multi_head_attention(q, k, v, self.use_dot_product_attention)
        out = dense(c, "to_out_0", dtype=self.dtype, axes=ATTN_OUT_AXES)
        return out(a.reshape(b, length, c))


class GEGLUFeedForward(nn.Module):
    """net_2(h * gelu(gate)) with (h, gate) = split(net_0.proj(x)): the gated GELU feed-forward
    of Shazeer (2020) with a 4x hidden width, as in latent diffusion's transformer blocks."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        # One kernel holds both halves (diffusers' layout), so a 'tensor' split of its "mlp"
        # dimension puts h and gate of a unit on different devices; XLA moves the gate.
        proj = dense(2 * self.mult * c, "net_0.proj", dtype=self.dtype, axes=MLP_IN_AXES)
        h, gate = jnp.split(proj(x), 2, -1)
        out = dense(c, "net_2", dtype=self.dtype, axes=MLP_OUT_AXES)
        return out(h * nn.gelu(gate, approximate=False))


class TransformerBlock(nn.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)) (pre-norm)."""

    num_heads: int
    use_dot_product_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        attn = dict(use_dot_product_attention=self.use_dot_product_attention, dtype=self.dtype)
        x = x + CrossAttention(self.num_heads, **attn, name="attn1")(
            layer_norm("norm1", dtype=self.dtype)(x)
        )
        x = x + CrossAttention(self.num_heads, **attn, name="attn2")(
            layer_norm("norm2", dtype=self.dtype)(x), context
        )
        return x + GEGLUFeedForward(dtype=self.dtype, name="ff")(
            layer_norm("norm3", dtype=self.dtype)(x)
        )


class SpatialTransformer(nn.Module):
    """Latent diffusion's cross-attention block (Rombach et al. 2022, Sec. 3.3) over the
    H*W positions of x (B, H, W, C), conditioned on `context` (B, M, D):

        h = proj_in(group_norm(x)) -> `depth` TransformerBlocks -> proj_out; out = x + h

    proj_in/out are 1x1 convs (SD v1) or Dense layers (`linear_projection`, SD v2). Names
    follow diffusers' Transformer2DModel."""

    num_heads: int
    depth: int = 1
    linear_projection: bool = False
    groups: int = 32
    eps: float = 1e-6
    use_dot_product_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"model attention: {c} channels do not split into {self.num_heads}")

        def proj(name, init_scale=1.0):
            if self.linear_projection:
                return dense(c, name, init_scale=init_scale, dtype=self.dtype)
            return conv(c, name, kernel=1, padding=0, init_scale=init_scale, dtype=self.dtype)

        h = group_norm("norm", groups=self.groups, eps=self.eps, dtype=self.dtype)(x)
        h = proj("proj_in")(h).reshape(b, hgt * wid, c)
        for i in range(self.depth):
            h = TransformerBlock(
                self.num_heads,
                self.use_dot_product_attention,
                self.dtype,
                name=f"transformer_blocks_{i}",
            )(h, context)
        h = proj("proj_out", init_scale=0.0)(h.reshape(b, hgt, wid, c))
        return x + h
