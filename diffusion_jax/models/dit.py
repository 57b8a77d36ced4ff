"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"): a ViT over p x p patches of the (latent) image, conditioned through adaLN-Zero.

    tokens = patchify(x) W_patch + pos            (B, N, D), N = (S / p)^2, fixed 2-D sin-cos pos
    c      = MLP(sincos_256(t)) + E_label[y]      (B, D), y = num_classes is the null label
    block  : (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(silu(c))   (zero-init)
             h += gate1 * Attn(LN(h) (1 + scale1) + shift1)
             h += gate2 * MLP(LN(h) (1 + scale2) + shift2)
    final  : (shift, scale) = Linear(silu(c)) (zero-init); out = Linear(LN(h) (1 + scale) + shift)
    out    = unpatchify(out)                      (B, S, S, C_out), C_out = 2 C with learned sigma

The original repository computes one c shared by every block (DiT-XL/2: 675,129,632
parameters, counting its frozen position table); diffusers' DiTTransformer2DModel gives every
block its own timestep-and-label embedder and conditions the final layer on the first
block's (`per_block_embedders`, 749,826,464 for DiT-XL/2 at 256 px). Submodule names follow
diffusers (`transformer_blocks_0.attn1.to_q`, ...), so importing either layout is a renaming
plus transposes (see `convert/dit.py`). Activations are (B, H, W, C), NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import layers

Dtype = Any

FREQUENCY_DIM = 256  # the sinusoidal features of t fed to the timestep MLP
_ZEROS = nn.initializers.zeros_init()


def sincos_position_embedding(dim: int, grid: int) -> np.ndarray:
    """The fixed 2-D sin-cos position table of MAE and DiT, (grid * grid, dim) float32, row-major
    over the patches (i = row, j = column):

        emb[(i, j)] = [sin(j w), cos(j w), sin(i w), cos(i w)],  w_k = 10000^(-k / (dim / 4))

    for k < dim / 4 (the column comes first, as in the original's meshgrid). Computed in
    float64, as the original does, then rounded."""
    if dim % 4:
        raise ValueError(f"model.dit.hidden_size: {dim} is not divisible by 4 (2-D sin-cos)")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid), indexing="ij")
    parts = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        args = pos[:, None] * omega[None, :]
        parts += [np.sin(args), np.cos(args)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def patchify(x, p: int):
    """(B, H, W, C) -> (B, H/p, W/p, p * p * C): each patch's pixels in (row, column, channel)
    order, the order of a (p, p, C, D) kernel's first three dimensions."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def unpatchify(x, p: int, channels: int):
    """(B, N, p * p * C) -> (B, sqrt(N) p, sqrt(N) p, C), the inverse of `patchify` (the
    original's einsum 'nhwpqc->nchpwq' in NHWC)."""
    b, n, _ = x.shape
    g = int(round(n**0.5))
    x = x.reshape(b, g, g, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * p, g * p, channels)


def _dense(features, name, axes=layers.DENSE_AXES, *, init=None, bias_axes=None, dtype):
    kernel_init = layers.default_init() if init is None else init
    bias_init = _ZEROS if bias_axes is None else nn.with_logical_partitioning(_ZEROS, bias_axes)
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=bias_init,
        name=name,
    )


class PatchEmbed(nn.Module):
    """A p x p convolution with stride p, computed as one matmul per patch: (B, S, S, C) ->
    (B, N, D). Its kernel is nn.Conv's (p, p, C, D), initialised as the original's
    Xavier-uniform over the flattened (C p p, D) matrix."""

    hidden_size: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p, c = self.patch_size, x.shape[-1]
        init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2))
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(init, layers.CONV_AXES),
            (p, p, c, self.hidden_size),
            jnp.float32,
        )
        bias = self.param("bias", _ZEROS, (self.hidden_size,), jnp.float32)
        patches = patchify(x.astype(self.dtype), p)
        y = patches @ kernel.reshape(p * p * c, -1).astype(self.dtype) + bias.astype(self.dtype)
        return y.reshape(x.shape[0], -1, self.hidden_size)


class ConditionEmbedding(nn.Module):
    """c = MLP(sincos(t)) + E[labels] (B, D): the timestep embedder (Linear, SiLU, Linear on
    FREQUENCY_DIM cos-first features) plus the label table of `num_classes` rows, one more
    for the null label when `null_class` (0 classes: no table). Initialised N(0, 0.02^2) as
    the original. Names follow diffusers' CombinedTimestepLabelEmbeddings."""

    hidden_size: int
    num_classes: int = 0
    null_class: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_freq, labels):
        init = nn.initializers.normal(0.02)
        h = _dense(self.hidden_size, "timestep_embedder.linear_1", init=init, dtype=self.dtype)(
            t_freq
        )
        c = _dense(self.hidden_size, "timestep_embedder.linear_2", init=init, dtype=self.dtype)(
            nn.silu(h)
        )
        if self.num_classes > 0:
            table = nn.Embed(
                self.num_classes + int(self.null_class),
                self.hidden_size,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                embedding_init=init,
                name="class_embedder.embedding_table",
            )
            c = c + table(labels)
        return c


def _embedder(module, name):
    return ConditionEmbedding(
        module.hidden_size, module.num_classes, module.null_class, module.dtype, name=name
    )


def modulate(x, shift, scale):
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift, scale (B, D) per example."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm(eps, dtype):
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biases: to_out(attention(to_q(x), to_k(x), to_v(x))),
    x (B, N, D). The q/k/v kernels split their output (heads) and to_out its input over the
    'tensor' mesh axis. Xavier-uniform as the original's fused qkv (D, 3D) matrix: scale 1/2
    of each (D, D) part's own fan average."""

    num_heads: int
    dropout: float = 0.0
    use_dot_product_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        b, n, d = x.shape
        qkv_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
        q, k, v = (
            _dense(d, name, layers.QKV_AXES, init=qkv_init, bias_axes=("heads",), dtype=self.dtype)(
                x
            ).reshape(b, n, self.num_heads, d // self.num_heads)
            for name in ("to_q", "to_k", "to_v")
        )
        a = layers.multi_head_attention(q, k, v, self.use_dot_product_attention)
        out = _dense(d, "to_out_0", layers.ATTN_OUT_AXES, dtype=self.dtype)(a.reshape(b, n, d))
        return nn.Dropout(self.dropout, deterministic=not train)(out)


class FeedForward(nn.Module):
    """net_2(dropout(gelu_tanh(net_0.proj(x)))): the MLP of width `mlp_dim`, split over the
    'tensor' mesh axis along its hidden units."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        h = _dense(
            self.mlp_dim, "net_0.proj", layers.MLP_IN_AXES, bias_axes=("mlp",), dtype=self.dtype
        )(x)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(h, approximate=True))
        return _dense(x.shape[-1], "net_2", layers.MLP_OUT_AXES, dtype=self.dtype)(h)


class DiTBlock(nn.Module):
    """One adaLN-Zero block (module doc). With `per_block_embedders` it computes its own c
    from (t_freq, labels) (`norm1.emb`); otherwise it is handed the shared c. Returns
    (h, c)."""

    hidden_size: int
    num_heads: int
    mlp_dim: int
    num_classes: int = 0
    null_class: bool = True
    per_block_embedders: bool = False
    mlp_norm_eps: float = 1e-6
    dropout: float = 0.0
    use_dot_product_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, t_freq, labels, train: bool):
        if self.per_block_embedders:
            c = _embedder(self, "norm1.emb")(t_freq, labels)
        mod = _dense(6 * self.hidden_size, "norm1.linear", init=_ZEROS, dtype=self.dtype)
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod(nn.silu(c)), 6, axis=-1)
        h = modulate(_layer_norm(1e-6, self.dtype)(x), shift1, scale1)
        h = SelfAttention(
            self.num_heads,
            self.dropout,
            self.use_dot_product_attention,
            self.dtype,
            name="attn1",
        )(h, train)
        x = x + gate1[:, None, :] * h
        h = modulate(_layer_norm(self.mlp_norm_eps, self.dtype)(x), shift2, scale2)
        h = FeedForward(self.mlp_dim, self.dropout, self.dtype, name="ff")(h, train)
        return x + gate2[:, None, :] * h, c


class DiT(nn.Module):
    """Noise-prediction transformer: (x_t (B, S, S, C), t (B,), labels (B,) | None) ->
    (B, S, S, out_channels), float32 whatever `dtype` the activations use (module doc).

    Label `num_classes` is the null label of classifier-free guidance, used when `labels` is
    None; it has a row only with `null_class` (the original adds it when training drops
    labels). `freq_shift` is the timestep features' frequency shift: 0 in the original
    (w_i = 10000^(-i/128)), 1 in diffusers' port (10000^(-i/127)); imported weights keep the
    convention they are evaluated with. `context` is accepted for the U-Net's signature and
    must be None: DiT has no cross-attention.
    """

    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    out_channels: int = 8
    num_classes: int = 0
    null_class: bool = True
    per_block_embedders: bool = False
    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    dropout: float = 0.0
    use_dot_product_attention: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, labels=None, train: bool = False, context=None):
        if context is not None:
            raise ValueError("model.arch: DiT takes no context; use class labels")
        b, size, _, _ = x.shape
        p = self.patch_size
        if self.num_classes > 0 and labels is None:
            if not self.null_class:
                raise ValueError(
                    "model: this DiT has no null class (trained with training.cond_drop_prob=0)"
                    "; give labels"
                )
            labels = jnp.full((b,), self.num_classes, jnp.int32)
        t_freq = layers.timestep_embedding(
            t, FREQUENCY_DIM, flip_sin_to_cos=True, freq_shift=self.freq_shift
        ).astype(self.dtype)

        h = PatchEmbed(self.hidden_size, p, self.dtype, name="pos_embed.proj")(x)
        pos = sincos_position_embedding(self.hidden_size, size // p)
        h = h + jnp.asarray(pos, self.dtype)[None]
        c = None if self.per_block_embedders else _embedder(self, "emb")(t_freq, labels)

        block_cls = nn.remat(DiTBlock, static_argnums=(5,)) if self.remat else DiTBlock
        first_c = c
        for i in range(self.depth):
            h, c_i = block_cls(
                self.hidden_size,
                self.num_heads,
                int(self.hidden_size * self.mlp_ratio),
                self.num_classes,
                self.null_class,
                self.per_block_embedders,
                self.mlp_norm_eps,
                self.dropout,
                self.use_dot_product_attention,
                self.dtype,
                name=f"transformer_blocks_{i}",
            )(h, c, t_freq, labels, train)
            first_c = c_i if i == 0 else first_c

        # The final layer: conditioned on the shared c, or (diffusers) on the first block's.
        mod = _dense(2 * self.hidden_size, "proj_out_1", init=_ZEROS, dtype=self.dtype)
        shift, scale = jnp.split(mod(nn.silu(first_c)), 2, axis=-1)
        h = modulate(_layer_norm(1e-6, self.dtype)(h), shift, scale)
        h = _dense(p * p * self.out_channels, "proj_out_2", init=_ZEROS, dtype=self.dtype)(h)
        return unpatchify(h, p, self.out_channels).astype(jnp.float32)
