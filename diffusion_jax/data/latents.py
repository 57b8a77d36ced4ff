"""Latent shards: the data set of a latent diffusion run, on disk.

`--mode=encode` (`diffusion_jax.jobs.encode`) writes them: each process writes its own shards
`<data.latents>/<split>-<process>-<shard>.npz` holding `latent` (N, h, w, c) float32, already
multiplied by `autoencoder.scaling_factor`, `label` (N,), and for captioned data `context`
(N, M, D), their text encoder's embeddings, and `tokens` (N, M) int32, their token ids;
`<split>-meta.json` records the shape and the autoencoder (its path and the sha256 of its
weights, so that latents of another autoencoder are noticed).
Several hosts need `data.latents` on a file system or bucket they all see (as checkpoints do).

This module knows the format only: nothing here loads or runs the autoencoder.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import errors, paths

SHARD_EXAMPLES = 8192  # examples per shard file


def latents_dir(config, workdir) -> paths.Path:
    """data.latents, or <workdir>/latents when it is empty."""
    return paths.path(config.data.latents or paths.path(workdir) / "latents")


def with_latents_dir(config, workdir) -> ml_collections.ConfigDict:
    """A copy of `config` whose data.latents names the shard directory explicitly."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.latents = str(latents_dir(config, workdir))
    return config


def shard_path(folder, split: str, process: int, shard: int) -> paths.Path:
    return paths.path(folder) / f"{split}-{process:05d}-{shard:05d}.npz"


def meta_path(folder, split: str) -> paths.Path:
    return paths.path(folder) / f"{split}-meta.json"


def write_shard(path, arrays: dict[str, np.ndarray]) -> None:
    """One shard file: {"latent", "label", ["context"]}, each with the same first axis."""
    paths.save_npz(path, **arrays)


def write_meta(folder, split: str, meta: dict) -> None:
    paths.write_text(meta_path(folder, split), json.dumps(meta, indent=2) + "\n")


def read_meta(folder, split: str) -> dict:
    return json.loads(meta_path(folder, split).read_text())


def remove_split(folder, split: str) -> None:
    """Deletes the shards and the meta file of `split` (before encoding it again)."""
    for path in paths.path(folder).glob(f"{split}-*"):
        path.unlink()


def latents_exist(config, split: str) -> bool:
    return meta_path(config.data.latents, split).exists()


def load_latents(config, split: str) -> dict[str, np.ndarray]:
    """All shards of `split` in data.latents: {"image": latents, "label", ["context"]}."""
    folder = paths.path(config.data.latents)
    meta_file = meta_path(folder, split)
    files = sorted(folder.glob(f"{split}-*-*.npz"))
    if not meta_file.exists() or not files:
        raise FileNotFoundError(
            f"config.data.latents: no {split} latents in {folder}; write them with "
            "--mode=encode (the same config and workdir)"
        )
    meta = json.loads(meta_file.read_text())
    want = list(config_lib.model_input_shape(config))
    if meta["shape"] != want:
        raise errors.ConfigError(
            f"config.data.latents: {folder} holds latents of (size, channels) {meta['shape']}, "
            f"the model expects {want}; encode again with this autoencoder"
        )
    parts = [paths.load_npz(f) for f in files]
    out = {
        "image": np.concatenate([p["latent"] for p in parts]).astype(np.float32),
        "label": np.concatenate([p["label"] for p in parts]).astype(np.int32),
    }
    # A run that trains its text encoder reads the captions' tokens, the others their
    # (frozen) encoder's contexts.
    key = "tokens" if config.training.train_text_encoder else "context"
    if key == "tokens" and "tokens" not in parts[0]:
        raise errors.ConfigError(
            f"config.training.train_text_encoder: the latents in {folder} hold no caption "
            "tokens; encode again with --mode=encode"
        )
    if key in parts[0]:
        dtype = np.int32 if key == "tokens" else np.float32
        out["context"] = np.concatenate([p[key] for p in parts]).astype(dtype)
    return out
