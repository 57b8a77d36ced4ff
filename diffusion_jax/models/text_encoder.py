"""CLIP's text transformer (Radford et al. 2021), as Stable Diffusion conditions on it.

tokens (B, L) int32 -> last hidden states (B, L, width) after the final layer norm: token +
position embeddings, `num_layers` pre-norm blocks of causal self-attention and an MLP, then
a layer norm. Names follow transformers' CLIPTextModel (`text_model.` dropped), so a
published `text_encoder/` folder imports by renaming and transposing (`convert/text_encoder.py`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import layers

Dtype = Any


def quick_gelu(x):
    """x sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class EncoderLayer(nn.Module):
    """x += out_proj(causal_attention(layer_norm1(x))); x += fc2(act(fc1(layer_norm2(x))))."""

    num_heads: int
    mlp_dim: int
    activation: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, length, width = x.shape
        h = layers.layer_norm("layer_norm1", eps=self.eps, dtype=self.dtype)(x)
        q, k, v = (
            layers.dense(width, f"self_attn.{name}", dtype=self.dtype)(h).reshape(
                b, length, self.num_heads, width // self.num_heads
            )
            for name in ("q_proj", "k_proj", "v_proj")
        )
        a = layers.multi_head_attention(q, k, v, causal=True).reshape(b, length, width)
        x = x + layers.dense(width, "self_attn.out_proj", dtype=self.dtype)(a)
        h = layers.layer_norm("layer_norm2", eps=self.eps, dtype=self.dtype)(x)
        h = ACTIVATIONS[self.activation](layers.dense(self.mlp_dim, "mlp.fc1", dtype=self.dtype)(h))
        return x + layers.dense(width, "mlp.fc2", dtype=self.dtype)(h)


class CLIPTextEncoder(nn.Module):
    """tokens (B, L) int32, L <= max_length -> (B, L, width) float32."""

    vocab_size: int = 49408
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_length: int = 77
    activation: str = "quick_gelu"
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"tokens: length {tokens.shape[1]} > max_length {self.max_length}")
        embed = dict(dtype=self.dtype, param_dtype=jnp.float32)
        h = nn.Embed(self.vocab_size, self.width, **embed, name="embeddings.token_embedding")(
            tokens
        )
        positions = nn.Embed(
            self.max_length, self.width, **embed, name="embeddings.position_embedding"
        )(jnp.arange(tokens.shape[1]))
        h = h + positions[None]
        for i in range(self.num_layers):
            h = EncoderLayer(
                self.num_heads,
                self.mlp_dim,
                self.activation,
                self.eps,
                self.dtype,
                name=f"encoder.layers_{i}",
            )(h)
        h = layers.layer_norm("final_layer_norm", eps=self.eps, dtype=self.dtype)(h)
        return h.astype(jnp.float32)


def text_encoder_inputs(max_length: int, batch: int = 1) -> tuple:
    """Example positional inputs (tokens,) of `CLIPTextEncoder`, for init and shape
    evaluation: tokens (B, max_length) int32 zeros. A 1-tuple, to unpack like the other
    models' example inputs."""
    return (jnp.zeros((batch, max_length), jnp.int32),)
