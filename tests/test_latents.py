"""Latent shards remember the autoencoder that made them: a latent run whose
autoencoder.weights changed encodes its data again instead of training on stale latents."""

import logging
from pathlib import Path

import numpy as np

from diffusion_jax import export
from diffusion_jax.config import base_config
from diffusion_jax.data import latents
from diffusion_jax.jobs import encode
from diffusion_jax.weights import load_autoencoder

TINY_VAE = Path(__file__).parent / "fixtures" / "tiny_sd" / "vae"


def latent_config():
    c = base_config()
    c.data.dataset, c.data.image_size, c.data.channels = "synthetic", 16, 3
    a = c.autoencoder
    a.weights = str(TINY_VAE)
    a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels, a.norm_groups = 8, (1, 2), 1, 4, 4
    c.sampling.clip_denoised = False
    return c


def shard_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("train-*.npz")}


def test_latents_of_another_autoencoder_are_encoded_again(tmp_path, caplog):
    config = latents.with_latents_dir(latent_config(), tmp_path)  # as preflight.resolve does
    encode.ensure_latents(config, tmp_path)
    encoded = config
    folder = Path(encoded.data.latents)
    meta = latents.read_meta(folder, "train")
    _, params = load_autoencoder(config)
    assert meta["autoencoder_sha256"] == export.params_fingerprint(params)
    first = shard_times(folder)

    encode.ensure_latents(config, tmp_path)  # the same autoencoder: nothing to do
    assert shard_times(folder) == first

    # Shards of another autoencoder, one more of them than this one writes.
    latents.write_meta(folder, "train", {**meta, "autoencoder_sha256": "0" * 64})
    stale = latents.shard_path(folder, "train", 0, 99)
    latents.write_shard(stale, {"latent": np.zeros((2, 8, 8, 4)), "label": np.zeros(2)})
    with caplog.at_level(logging.WARNING, logger="diffusion_jax"):
        encode.ensure_latents(config, tmp_path)
    assert "were made by another autoencoder" in caplog.text
    assert latents.read_meta(folder, "train")["autoencoder_sha256"] == meta["autoencoder_sha256"]
    assert not stale.exists()
    data = latents.load_latents(encoded, "train")
    assert data["image"].shape == (1024, 8, 8, 4)


def test_the_fingerprint_is_of_the_values_not_the_container():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.normal(size=(3, 4))}, "b": rng.normal(size=(5,))}
    same = {"b": params["b"].astype(np.float64), "a": {"kernel": params["a"]["kernel"].copy()}}
    assert export.params_fingerprint(params) == export.params_fingerprint(same)
    changed = {"a": {"kernel": params["a"]["kernel"] + 1e-3}, "b": params["b"]}
    assert export.params_fingerprint(params) != export.params_fingerprint(changed)
