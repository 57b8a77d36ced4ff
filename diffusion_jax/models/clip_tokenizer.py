"""CLIP's byte-level BPE tokenizer, read from a tokenizer folder (vocab.json, merges.txt and
the special-token files of transformers' CLIPTokenizer).

Text is cleaned (HTML entities, runs of whitespace) and lower-cased, split by CLIP's pattern
into words, each word's UTF-8 bytes mapped to printable characters (GPT-2's byte encoder),
the last character marked with `</w>`, and merged by the ranks in merges.txt. A prompt
becomes `<|startoftext|> ids <|endoftext|>`, cut or padded to `max_length` (77).
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path

import numpy as np
import regex

WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
END_OF_WORD = "</w>"


@functools.lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """Each of the 256 byte values -> a printable unicode character (identity where the byte
    is already a printable Latin-1 character), so that BPE never sees whitespace or control
    bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clean(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _token_content(value) -> str:
    return value["content"] if isinstance(value, dict) else value


class CLIPTokenizer:
    """tokenize(prompts) -> (N, max_length) int32 token ids."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        max_length=77,
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
    ):
        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.max_length = max_length
        missing = [t for t in (bos, eos, pad) if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer vocab.json: special token {missing[0]!r} is missing")
        self.bos_id, self.eos_id, self.pad_id = vocab[bos], vocab[eos], vocab[pad]
        self._bpe = functools.lru_cache(maxsize=50_000)(self._merge)

    @classmethod
    def from_folder(cls, folder) -> CLIPTokenizer:
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).exists():
                raise FileNotFoundError(f"{folder / name} does not exist (a tokenizer folder?)")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        special = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).exists():
                special.update(json.loads((folder / name).read_text()))
        kwargs = {
            key: _token_content(special[f"{key}_token"])
            for key in ("bos", "eos", "pad")
            if special.get(f"{key}_token")
        }
        max_length = int(special.get("model_max_length", 77))
        return cls(vocab, merges, max_length=min(max_length, 77), **kwargs)

    def _merge(self, word: str) -> tuple[str, ...]:
        """Byte-pair merges of one word (already byte-encoded), lowest rank first."""
        parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pairs = zip(parts[:-1], parts[1:], strict=True)
            rank, pair = min((self.ranks.get(p, np.inf), p) for p in pairs)
            if rank == np.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens."""
        encoder = byte_encoder()
        ids = []
        for word in WORD_PATTERN.findall(clean(text)):
            chars = "".join(encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.vocab[piece] for piece in self._bpe(chars))
        return ids

    def __call__(self, prompts) -> np.ndarray:
        """(N, max_length) int32: start, ids, end, then padding; cut to keep the end token."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        for row, text in enumerate(prompts):
            ids = [self.bos_id] + self.encode(text)[: self.max_length - 2] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out
