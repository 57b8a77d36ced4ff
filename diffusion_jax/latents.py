"""Latent diffusion's data side: the trained autoencoder, latents as a data set, decoding.

`autoencoder.weights` names the autoencoder a latent run uses: the workdir of a run with
`training.objective="autoencoder"` (its newest checkpoint's EMA weights), a file written by
`--mode=export`, or a diffusers AutoencoderKL folder (config.json + safetensors, e.g. Stable
Diffusion's `vae/`). Its architecture must equal `config.autoencoder`.

`--mode=encode` (and a latent training run whose shards are missing) encodes the training
split once: every device encodes a slice of each batch, each process writes its own shards
`<data.latents>/<split>-<process>-<shard>.npz` holding `latent` (N, h, w, c) float32 already
multiplied by `autoencoder.scaling_factor`, `label` (N,), and `context` (N, M, D) when the
data carry text embeddings; `<split>-meta.json` records the shape and the autoencoder.
Several hosts need `data.latents` on a file system they all see (as checkpoints do).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import checkpointing, export, parallel
from diffusion_jax import config as config_lib
from diffusion_jax.models import convert

log = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = (
    "ch",
    "ch_mult",
    "num_res_blocks",
    "latent_channels",
    "norm_groups",
    "norm_eps",
    "mid_attention",
)
SHARD_EXAMPLES = 8192


def latents_dir(config, workdir) -> Path:
    return Path(config.data.latents) if config.data.latents else Path(workdir) / "latents"


def with_latents_dir(config, workdir) -> ml_collections.ConfigDict:
    """A copy of `config` whose data.latents names the shard directory explicitly."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.latents = str(latents_dir(config, workdir))
    return config


def _autoencoder_config(config) -> ml_collections.ConfigDict:
    """A copy of config that trains its autoencoder (for the autoencoder's input shapes)."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.training.objective = "autoencoder"
    return out


def check_architecture(config, found: dict, source) -> None:
    """Refuses weights whose autoencoder differs from config.autoencoder, naming the field."""
    for key in ARCHITECTURE_FIELDS:
        want, have = config.autoencoder[key], found[key]
        if isinstance(want, list | tuple):
            want, have = tuple(want), tuple(have)
        if want != have:
            raise config_lib.ConfigError(
                f"config.autoencoder.{key}: {want!r} differs from {have!r} of the autoencoder "
                f"in {source}"
            )


def abstract_autoencoder_params(config):
    from diffusion_jax.models import create_autoencoder, init_inputs

    inputs = init_inputs(_autoencoder_config(config))
    model = create_autoencoder(config)
    return nn.unbox(jax.eval_shape(lambda k: model.init(k, *inputs), jax.random.key(0)))["params"]


def load_autoencoder(config):
    """(module, params) of the autoencoder named by config.autoencoder.weights (module doc)."""
    from diffusion_jax.models import create_autoencoder

    source = Path(config.autoencoder.weights or Path(config.pretrained) / "vae")
    if not source.exists():
        raise FileNotFoundError(
            f"config.autoencoder.weights: {source} does not exist; train one with "
            "--config.training.objective=autoencoder or give a diffusers AutoencoderKL folder"
        )
    if source.is_dir() and (source / convert.WEIGHTS_FILE).exists():
        params, fields = convert.autoencoder_from_diffusers(source)
        check_architecture(config, fields, source)
    elif source.is_file():
        params, saved = export.load_params(source)
        check_architecture(config, saved.autoencoder.to_dict(), source)
    else:
        run_config = source / "config.json"
        if not run_config.exists():
            raise FileNotFoundError(
                f"config.autoencoder.weights: {source} is not an autoencoder run (no config.json), "
                "an exported .msgpack or a diffusers AutoencoderKL folder"
            )
        saved = json.loads(run_config.read_text())
        if saved["training"].get("objective") != "autoencoder":
            raise config_lib.ConfigError(
                f"config.autoencoder.weights: {source} trained "
                f"{saved['training'].get('objective', 'diffusion')!r}, not an autoencoder"
            )
        check_architecture(config, saved["autoencoder"], run_config)
        manager = checkpointing.make_manager(source, read_only=True)
        steps = manager.all_steps()
        if not steps:
            where = checkpointing.checkpoint_dir(source)
            raise FileNotFoundError(f"config.autoencoder.weights: no checkpoint in {where}")
        params = checkpointing.restore_ema(manager, max(steps), abstract_autoencoder_params(config))
        manager.close()
    return create_autoencoder(config), jax.tree.map(jnp.asarray, params)


def make_encode_fn(model, scaling_factor: float, mesh):
    """jitted (params, images (B, H, W, C)) -> scaling_factor * posterior mean, split over
    the mesh's batch axes."""
    sharding = parallel.batch_sharding(mesh)

    def encode(params, images):
        mean, _ = model.apply({"params": params}, images, method=model.encode)
        return scaling_factor * mean

    return jax.jit(encode, in_shardings=(None, sharding), out_shardings=sharding)


def make_decode_fn(model, scaling_factor: float):
    """(params, latents (..., h, w, c)) -> images (..., H, W, C) in [-1, 1]; leading axes
    are flattened into one batch."""

    def decode(params, latents):
        lead = latents.shape[:-3]
        flat = latents.reshape((-1,) + latents.shape[-3:]) / scaling_factor
        images = model.apply({"params": params}, flat, method=model.decode)
        return jnp.clip(images, -1.0, 1.0).reshape(lead + images.shape[1:])

    return decode


def _local_batches(config, split: str, per_host: int):
    """This process's examples of `split`, once, in order, in batches of `per_host` rows."""
    from diffusion_jax.data import pipeline

    d = config.data
    if d.dataset in pipeline.IN_MEMORY:
        images, labels = pipeline.load_in_memory(config, split)
        parts = np.array_split(np.arange(len(images)), jax.process_count())
        mine = parts[jax.process_index()]
        # Every process runs the same number of (padded) batches: the encode is collective.
        num_batches = -(-max(len(p) for p in parts) // per_host)
        for i in range(num_batches):
            idx = mine[i * per_host : (i + 1) * per_host]
            yield {"image": images[idx], "label": labels[idx], "index": idx}
        return
    from diffusion_jax.data import tfds_source

    yield from tfds_source.batches(
        config,
        split=split,
        global_batch=per_host * jax.process_count(),
        seed=0,
        start_step=0,
        train=False,
    )


def encode_dataset(config, workdir, split: str | None = None) -> Path:
    """Encodes `split` (data.train_split) of config.data to latent shards (module doc)."""
    from diffusion_jax.evaluation import sampling

    split = split or config.data.train_split
    out_dir = latents_dir(config, workdir)
    mesh = parallel.make_mesh(config)
    model, params = load_autoencoder(config)
    params = jax.device_put(params, parallel.replicated(mesh))
    scaling = config.autoencoder.scaling_factor
    encode = make_encode_fn(model, scaling, mesh)
    global_batch = sampling.padded_batch(config.sampling.batch_size, mesh.size)
    per_host = global_batch // jax.process_count()
    d = config.data
    shards, pending, total = 0, [], 0
    moments = np.zeros(2)  # sum and sum of squares of the scaled latents, for the log

    def flush():
        nonlocal shards, pending
        if not pending:
            return
        arrays = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        name = f"{split}-{jax.process_index():05d}-{shards:05d}.npz"
        np.savez(out_dir / name, **arrays)
        shards, pending = shards + 1, []

    captions = encoder = None
    if config_lib.is_text_conditioned(config):
        captions, encoder = _captions_and_encoder(config, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    for batch in _local_batches(config, split, per_host):
        valid = len(batch["image"])
        images = np.zeros((per_host, d.image_size, d.image_size, d.channels), np.float32)
        images[:valid] = batch["image"]
        latents = encode(params, parallel_local_to_global(images, mesh))
        local = np.asarray(local_rows(latents, mesh))[:valid]
        if valid:
            pending.append({"latent": local, "label": np.asarray(batch["label"][:valid])})
            if encoder is not None:
                pending[-1]["context"] = encoder([captions[i] for i in batch["index"]])
            total += valid
            moments += (local.sum(), np.square(local).sum())
        if sum(len(p["latent"]) for p in pending) >= SHARD_EXAMPLES:
            flush()
    flush()
    if parallel.is_main_process():
        meta = {
            "split": split,
            "shape": list(config_lib.model_input_shape(config)),
            "scaling_factor": scaling,
            "autoencoder": str(config.autoencoder.weights),
            "dataset": d.dataset,
            "image_size": d.image_size,
        }
        (out_dir / f"{split}-meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Every host reads every shard next: none may start before all are written.
        multihost_utils.sync_global_devices("latent shards written")
    size, channels = config_lib.model_input_shape(config)
    count = max(total * size * size * channels, 1)  # this process's latents
    std = float(np.sqrt(max(moments[1] / count - (moments[0] / count) ** 2, 0.0)))
    log.info(
        "encode: %d examples of %s/%s -> %s; scaled latents have std %.3f (for unit variance "
        "set autoencoder.scaling_factor=%.4g)",
        total,
        d.dataset,
        split,
        out_dir,
        std,
        scaling / std if std > 0 else scaling,
    )
    return out_dir


def _captions_and_encoder(config, split):
    """The captions of a folder data set and the text encoder of text_encoder.weights, checked
    against the model's context shape."""
    from diffusion_jax.data import folder
    from diffusion_jax.prompts import PromptEncoder

    m, d = config.model, config.data
    if d.dataset != "folder":
        raise config_lib.ConfigError(
            "config.data.dataset: text contexts are encoded from the captions of an image "
            "folder (<image>.txt beside each image); use dataset='folder'"
        )
    if not config.text_encoder.weights:
        raise config_lib.ConfigError(
            "config.text_encoder.weights: a folder with text_encoder/ and tokenizer/ is needed "
            "to encode captions (a Stable Diffusion pipeline folder works)"
        )
    encoder = PromptEncoder.from_folder(config.text_encoder.weights)
    if (encoder.max_length, encoder.width) != (m.context_length, m.context_dim):
        raise config_lib.ConfigError(
            f"config.model.context_dim: the text encoder gives contexts of {encoder.max_length} "
            f"x {encoder.width}; set model.context_length={encoder.max_length} and "
            f"model.context_dim={encoder.width}"
        )
    return folder.load_captions(d.data_dir, split), encoder


def parallel_local_to_global(rows: np.ndarray, mesh) -> jax.Array:
    return jax.make_array_from_process_local_data(parallel.batch_sharding(mesh), rows)


def local_rows(array: jax.Array, mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(
        multihost_utils.global_array_to_host_local_array(
            array, mesh, parallel.batch_sharding(mesh).spec
        )
    )


def load_latents(config, split: str) -> dict[str, np.ndarray]:
    """All shards of `split` in data.latents: {"image": latents, "label", ["context"]}."""
    folder = Path(config.data.latents)
    meta_file = folder / f"{split}-meta.json"
    files = sorted(folder.glob(f"{split}-*-*.npz"))
    if not meta_file.exists() or not files:
        raise FileNotFoundError(
            f"config.data.latents: no {split} latents in {folder}; write them with "
            "--mode=encode (the same config and workdir)"
        )
    meta = json.loads(meta_file.read_text())
    want = list(config_lib.model_input_shape(config))
    if meta["shape"] != want:
        raise config_lib.ConfigError(
            f"config.data.latents: {folder} holds latents of (size, channels) {meta['shape']}, "
            f"the model expects {want}; encode again with this autoencoder"
        )
    parts = [dict(np.load(f)) for f in files]
    out = {
        "image": np.concatenate([p["latent"] for p in parts]).astype(np.float32),
        "label": np.concatenate([p["label"] for p in parts]).astype(np.int32),
    }
    if "context" in parts[0]:
        out["context"] = np.concatenate([p["context"] for p in parts]).astype(np.float32)
    return out


def latents_exist(config, split: str) -> bool:
    folder = Path(config.data.latents)
    return (folder / f"{split}-meta.json").exists()
