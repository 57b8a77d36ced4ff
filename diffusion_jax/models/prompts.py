"""Text to cross-attention contexts: CLIP's tokenizer and text transformer from a folder that
holds `text_encoder/` and `tokenizer/` (a Stable Diffusion pipeline folder, for one)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import convert
from diffusion_jax.models.clip_tokenizer import CLIPTokenizer
from diffusion_jax.models.text_encoder import CLIPTextEncoder

ARCHITECTURE_FIELDS = (
    "vocab_size",
    "width",
    "num_layers",
    "num_heads",
    "mlp_dim",
    "max_length",
    "activation",
    "eps",
)


class PromptEncoder:
    """encoder(texts) -> (N, max_length, width) float32 last hidden states, in batches."""

    def __init__(self, params, fields: dict, tokenizer: CLIPTokenizer):
        self.params, self.tokenizer = params, tokenizer
        self.width, self.max_length = fields["width"], fields["max_length"]
        model = CLIPTextEncoder(**{k: fields[k] for k in ARCHITECTURE_FIELDS})
        self._apply = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))

    @classmethod
    def from_folder(cls, folder) -> PromptEncoder:
        """The encoder of a folder, read once per process: a fine-tuning run asks for it when
        checking its latents, for the empty prompt of dropped captions and for the negative
        prompt of its pictures."""
        return _from_folder(str(Path(folder).resolve()))

    def __call__(self, texts, batch_size: int = 64) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = jnp.asarray(self.tokenizer(texts[i : i + batch_size]))
            out.append(np.asarray(self._apply(self.params, tokens)))
        return np.concatenate(out) if out else np.zeros((0, self.max_length, self.width))


@functools.lru_cache(maxsize=2)
def _from_folder(folder: str) -> PromptEncoder:
    folder = Path(folder)
    params, fields = convert.text_encoder_from_transformers(folder / "text_encoder")
    return PromptEncoder(params, fields, CLIPTokenizer.from_folder(folder / "tokenizer"))
