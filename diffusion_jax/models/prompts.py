"""Text to cross-attention contexts: CLIP's tokenizer and text transformer from a folder that
holds `text_encoder/` and `tokenizer/` (a Stable Diffusion pipeline folder, for one), and
what a run's network takes as the context of a prompt (`prompt_context`) and of a dropped
caption (`null_text_context`)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import errors
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


def null_text_context(config):
    """The context a dropped caption becomes in a run fine-tuned from a pipeline folder: the
    empty prompt's, as Stable Diffusion was trained (and as its pipelines guide against):
    its token ids (L,) when the text encoder trains, its frozen encoder's embeddings (M, D)
    otherwise. None (zeros) for every other run."""
    if not (config.training.init_from and config_lib.is_text_conditioned(config)):
        return None
    return prompt_context(config, "")[0]


def prompt_context(config, prompts) -> np.ndarray:
    """What the network of `config` takes as the context of `prompts` (str or list): the
    embeddings (N, M, D) of text_encoder.weights, or, when the text encoder trains with the
    network, the token ids (N, L) its own encoder reads."""
    if not config.text_encoder.weights:
        raise errors.ConfigError(
            "config.text_encoder.weights: sampling.prompt needs the text encoder the model was "
            "trained with (a folder with text_encoder/ and tokenizer/)"
        )
    folder = Path(config.text_encoder.weights)
    if config.training.train_text_encoder:
        return CLIPTokenizer.from_folder(folder / "tokenizer")(prompts)
    return PromptEncoder.from_folder(folder)(prompts)
