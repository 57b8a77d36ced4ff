"""A denoiser trained together with its text encoder: the network of a fine-tuning run with
training.train_text_encoder, whose parameters are {"unet": ..., "text_encoder": ...}."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class TextTrainedDenoiser(nn.Module):
    """(x, t, labels, train, context) -> the denoiser's output, where `context` is either

    - token ids (B, L) int32, first encoded by `text_encoder` to (B, L, width): the form
      training and sampling use, so that the gradient reaches the text encoder and samples
      follow its trained weights;
    - embeddings (B, M, D) float, passed to the denoiser unchanged;
    - None: the denoiser's own null context (at init, the text encoder is initialized on
      zero tokens as well).
    """

    unet: nn.Module
    text_encoder: nn.Module

    def __call__(self, x, t, labels=None, train: bool = False, context=None):
        if context is None and self.is_initializing():
            context = jnp.zeros((x.shape[0], self.text_encoder.max_length), jnp.int32)
        if context is not None and jnp.issubdtype(context.dtype, jnp.integer):
            context = self.text_encoder(context)
        return self.unet(x, t, labels, train=train, context=context)
