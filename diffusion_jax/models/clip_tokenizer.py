"""CLIP's byte-level BPE tokenizer, read from a tokenizer folder in either layout
transformers writes: `tokenizer.json` (the fast-tokenizer file; today's
`CLIPTokenizer.save_pretrained` writes only it and tokenizer_config.json) or the older
`vocab.json` + `merges.txt` (+ special_tokens_map.json), as published Stable Diffusion
folders hold it.

Both go through Hugging Face's `tokenizers` library. tokenizer.json is that library's own
serialisation of a whole pipeline (normalizer, pre-tokenizer, BPE model, added tokens), so
reading it with the library follows whatever a file holds; the older layout is built into
the same pipeline transformers' CLIPTokenizer builds from those files (NFC, runs of
whitespace -> " ", lower case; CLIP's word pattern, GPT-2's byte encoding; BPE with the
`</w>` end-of-word suffix; the special tokens as added tokens). One engine for both layouts
gives transformers' ids for any text, unusual unicode, whitespace and punctuation included,
where a re-implementation would have to track every normalisation detail.

A prompt becomes `bos ids eos`, cut to keep the end token and padded with the pad token
(`<|endoftext|>` for v1.x, `!` for 2.x) to `max_length` (77).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# CLIP's word pattern (the special tokens, contractions, letters, single digits, other runs).
WORD_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
END_OF_WORD = "</w>"
DEFAULT_SPECIAL = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "pad": "<|endoftext|>",
    "unk": "<|endoftext|>",
}


def _token_content(value) -> str:
    return value["content"] if isinstance(value, dict) else value


def special_tokens(folder: Path) -> tuple[dict[str, str], int]:
    """({"bos", "eos", "pad", "unk"} token strings, model_max_length) from
    tokenizer_config.json and special_tokens_map.json, CLIP's defaults where absent."""
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            found.update(json.loads((folder / name).read_text(encoding="utf-8")))
    tokens = dict(DEFAULT_SPECIAL)
    for key in tokens:
        if found.get(f"{key}_token"):
            tokens[key] = _token_content(found[f"{key}_token"])
    return tokens, int(found.get("model_max_length", 77))


def clip_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], special) -> Tokenizer:
    """The pipeline transformers' CLIPTokenizer builds from vocab.json + merges.txt."""
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=special["unk"],
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # transformers registers its special tokens as added tokens, so they are matched whole in
    # the text (2.x's pad token "!" included) before normalisation.
    added = dict.fromkeys(special[k] for k in ("unk", "bos", "eos", "pad"))
    tokenizer.add_special_tokens(list(added))
    return tokenizer


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split()) for line in lines if line and not line.startswith("#version")]


class CLIPTokenizer:
    """tokenize(prompts) -> (N, max_length) int32 token ids."""

    def __init__(self, tokenizer: Tokenizer, special: dict[str, str], *, max_length: int = 77):
        self.tokenizer = tokenizer
        # Cutting and padding are done here, the same for both layouts.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.max_length = max_length
        ids = {key: tokenizer.token_to_id(special[key]) for key in ("bos", "eos", "pad")}
        missing = [special[key] for key, value in ids.items() if value is None]
        if missing:
            raise ValueError(f"tokenizer: special token {missing[0]!r} is not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    @classmethod
    def from_folder(cls, folder) -> CLIPTokenizer:
        folder = Path(folder)
        special, max_length = special_tokens(folder)
        if (folder / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            tokenizer = clip_bpe_tokenizer(vocab, _read_merges(folder / "merges.txt"), special)
        else:
            raise FileNotFoundError(
                f"{folder}: no tokenizer.json, nor vocab.json + merges.txt (a tokenizer folder?)"
            )
        return cls(tokenizer, special, max_length=min(max_length, 77))

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, prompts) -> np.ndarray:
        """(N, max_length) int32: start, ids, end, then padding; cut to keep the end token."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        encoded = self.tokenizer.encode_batch(prompts, add_special_tokens=False)
        for row, encoding in enumerate(encoded):
            ids = [self.bos_id] + encoding.ids[: self.max_length - 2] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out
