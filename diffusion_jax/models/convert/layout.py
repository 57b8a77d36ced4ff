"""Tensor names and layouts shared by every converted family (U-Net, autoencoder, text
encoder): Flax parameter paths <-> diffusers / transformers tensor names, the Flax <-> torch
kernel layouts, matching a tensor file against a parameter tree, and reading the folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import flax
import jax.numpy as jnp
import numpy as np

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Names of diffusers' deprecated attention block, still used by the published DDPM files.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Flax submodule names carry list indices as "_<i>" (flax joins no dots); diffusers as ".<i>".
_INDEXED = re.compile(
    r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out"
    r"|transformer_blocks|net|layers)_(\d+)"
)


def diffusers_name(path: tuple[str, ...]) -> str:
    """The diffusers name of a parameter path.

    ('down_blocks_1.attentions_0', 'to_q', 'kernel') -> 'down_blocks.1.attentions.0.to_q.weight'
    """
    *modules, leaf = path
    name = _INDEXED.sub(r"\1.\2", ".".join(modules))
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Flax conv kernel (kh, kw, in, out) -> torch (out, in, kh, kw); Dense (in, out) -> (out, in);
    embeddings, norms and biases keep their layout."""
    if leaf != "kernel":
        return array
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T


def from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of `to_torch_layout`."""
    if leaf != "kernel":
        return array
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T


def rename_legacy_attention(tensors: dict) -> dict:
    """The tensors with `LEGACY_ATTENTION` names (`...query.weight`) renamed to the current
    ones (`...to_q.weight`); others unchanged. Returns a new dict."""
    tensors = dict(tensors)
    for name in list(tensors):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
            tensors[".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])] = tensors.pop(
                name
            )
    return tensors


def match_tensors(tensors: dict[str, np.ndarray], abstract_params, *, prefix: str = "") -> dict:
    """The parameter tree shaped like `abstract_params` from tensors named `prefix` +
    `diffusers_name(path)`, transposed to the Flax layout; fails naming the first tensor that
    is missing, misshaped or left over."""
    tensors = dict(tensors)
    flat = flax.traverse_util.flatten_dict(abstract_params)
    params = {}
    for path, like in flat.items():
        name = prefix + diffusers_name(path)
        if name not in tensors:
            raise ValueError(f"weights file: tensor {name!r} (for {'/'.join(path)}) is missing")
        value = from_torch_layout(np.asarray(tensors.pop(name)), path[-1])
        if value.shape != like.shape:
            raise ValueError(
                f"weights file: tensor {name!r} has shape {tuple(value.shape)} after transposing, "
                f"expected {tuple(like.shape)} for {'/'.join(path)}"
            )
        params[path] = jnp.asarray(value, jnp.float32)
    if tensors:
        raise ValueError(f"weights file: tensor {sorted(tensors)[0]!r} matches no parameter")
    return flax.traverse_util.unflatten_dict(params)


def torch_tensors(params, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `match_tensors`: diffusers-named float32 tensors in the torch layout."""
    return {
        prefix + diffusers_name(path): np.ascontiguousarray(
            to_torch_layout(np.asarray(value, np.float32), path[-1])
        )
        for path, value in flax.traverse_util.flatten_dict(params).items()
    }


def read_json(path: Path):
    """The parsed JSON file at `path`, or None when it does not exist (optional files)."""
    return json.loads(path.read_text()) if path.exists() else None


def require_file(path: Path, what: str) -> Path:
    """`path`, or FileNotFoundError naming it and `what` it should be."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist ({what})")
    return path
