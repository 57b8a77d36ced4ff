"""--mode=encode: a latent run's data set through its autoencoder, once, to latent shards.

A latent training run whose shards are missing runs this first. Every device encodes a
slice of each batch and each process writes its own shards in the format of
`data/latents.py`; text-conditioned models also get the CLIP contexts and the token ids of
each image's caption (`<image>.txt` of a folder data set).
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import errors, export, parallel
from diffusion_jax.data import folder, latents, pipeline, tfds_source
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models.prompts import PromptEncoder
from diffusion_jax.weights import autoencoder_fingerprint, load_autoencoder, text_encoder_stamp

log = logging.getLogger(__name__)


def _local_batches(config, split: str, per_host: int):
    """This process's examples of `split`, once, in order, in batches of `per_host` rows."""
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
    yield from tfds_source.batches(
        config,
        split=split,
        global_batch=per_host * jax.process_count(),
        seed=0,
        start_step=0,
        train=False,
    )


def ensure_latents(config, workdir) -> None:
    """Encodes the training split of a latent run to data.latents (located by
    `preflight.resolve`) when its shards are missing, or are stale (`_stale`)."""
    if not config.data.latents:
        raise errors.ConfigError(
            "config.data.latents: not located; jobs take the run config that "
            "preflight.resolve gives"
        )
    split = config.data.train_split
    autoencoder = load_autoencoder(config)
    if not latents.latents_exist(config, split):
        log.info("latents: none in %s yet; encoding the training split once", config.data.latents)
    else:
        reason = _stale(config, latents.read_meta(config.data.latents, split), autoencoder)
        if reason is None:
            return
        log.warning("latents: %s/%s-* %s; encoding again", config.data.latents, split, reason)
    encode_dataset(config, workdir, autoencoder=autoencoder)


def _stale(config, meta: dict, autoencoder) -> str | None:
    """Why shards described by `meta` cannot serve `config`, or None: made by another
    autoencoder than autoencoder.weights, or (text models) their contexts by another text
    encoder than text_encoder.weights, or without the caption tokens a run that trains its
    text encoder reads."""
    if meta.get("autoencoder_sha256") != autoencoder_fingerprint(config):
        return (
            f"were made by another autoencoder ({meta.get('autoencoder', '?')}) than "
            f"{config.autoencoder.weights or config.pretrained}"
        )
    if not config_lib.is_text_conditioned(config):
        return None
    # The weights' size and time tell the same file without hashing its 0.5 GB again.
    if meta.get("text_encoder_stamp") != text_encoder_stamp(config.text_encoder.weights):
        encoder = PromptEncoder.from_folder(config.text_encoder.weights)
        if meta.get("text_encoder_sha256") != export.params_fingerprint(encoder.params):
            return f"hold the contexts of another text encoder than {config.text_encoder.weights}"
    if config.training.train_text_encoder and not meta.get("tokens"):
        return "hold no caption tokens"
    return None


def encode_dataset(config, workdir, split: str | None = None, autoencoder=None):
    """Encodes `split` (data.train_split) of config.data to latent shards (module doc),
    replacing any shards of that split; `autoencoder` (module, params) is loaded from
    autoencoder.weights when not given."""
    split = split or config.data.train_split
    out_dir = latents.latents_dir(config, workdir)
    mesh = parallel.make_mesh(config)
    model, params = autoencoder or load_autoencoder(config)
    fingerprint = autoencoder_fingerprint(config)
    params = jax.device_put(params, parallel.replicated(mesh))
    scaling = config.autoencoder.scaling_factor
    encode = ae_lib.make_encode_fn(model, scaling, mesh)
    global_batch = parallel.padded_batch(config.sampling.batch_size, mesh.size)
    per_host = global_batch // jax.process_count()
    d = config.data
    shards, pending, total = 0, [], 0
    moments = np.zeros(2)  # sum and sum of squares of the scaled latents, for the log

    def flush():
        nonlocal shards, pending
        if not pending:
            return
        arrays = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        latents.write_shard(latents.shard_path(out_dir, split, jax.process_index(), shards), arrays)
        shards, pending = shards + 1, []

    captions = encoder = None
    if config_lib.is_text_conditioned(config):
        captions, encoder = _captions_and_encoder(config, split)
    if parallel.is_main_process() and out_dir.exists():
        latents.remove_split(out_dir, split)
    _barrier("old latent shards removed")
    out_dir.mkdir(parents=True, exist_ok=True)
    for batch in _local_batches(config, split, per_host):
        valid = len(batch["image"])
        images = np.zeros((per_host, d.image_size, d.image_size, d.channels), np.float32)
        images[:valid] = batch["image"]
        encoded = encode(params, parallel.to_global(images, mesh))
        local = parallel.local_rows(encoded, mesh)[:valid]
        if valid:
            pending.append({"latent": local, "label": np.asarray(batch["label"][:valid])})
            if encoder is not None:
                texts = [captions[i] for i in batch["index"]]
                pending[-1]["context"] = encoder(texts)
                pending[-1]["tokens"] = encoder.tokenizer(texts)
            total += valid
            moments += (local.sum(), np.square(local).sum())
        if sum(len(p["latent"]) for p in pending) >= latents.SHARD_EXAMPLES:
            flush()
    flush()
    if parallel.is_main_process():
        meta = {
            "split": split,
            "shape": list(config_lib.model_input_shape(config)),
            "scaling_factor": scaling,
            "autoencoder": str(config.autoencoder.weights or config.pretrained),
            "autoencoder_sha256": fingerprint,
            "dataset": d.dataset,
            "image_size": d.image_size,
            "tokens": encoder is not None,
        }
        if encoder is not None:
            meta["text_encoder"] = str(config.text_encoder.weights)
            meta["text_encoder_sha256"] = export.params_fingerprint(encoder.params)
            meta["text_encoder_stamp"] = text_encoder_stamp(config.text_encoder.weights)
        latents.write_meta(out_dir, split, meta)
    # Every host reads every shard next: none may start before all are written.
    _barrier("latent shards written")
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


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _captions_and_encoder(config, split):
    """The captions of a folder data set and the text encoder of text_encoder.weights, checked
    against the model's context shape."""
    m, d = config.model, config.data
    if d.dataset != "folder":
        raise errors.ConfigError(
            "config.data.dataset: text contexts are encoded from the captions of an image "
            "folder (<image>.txt beside each image); use dataset='folder'"
        )
    if not config.text_encoder.weights:
        raise errors.ConfigError(
            "config.text_encoder.weights: a folder with text_encoder/ and tokenizer/ is needed "
            "to encode captions (a Stable Diffusion pipeline folder works)"
        )
    encoder = PromptEncoder.from_folder(config.text_encoder.weights)
    if (encoder.max_length, encoder.width) != (m.context_length, m.context_dim):
        raise errors.ConfigError(
            f"config.model.context_dim: the text encoder gives contexts of {encoder.max_length} "
            f"x {encoder.width}; set model.context_length={encoder.max_length} and "
            f"model.context_dim={encoder.width}"
        )
    return folder.load_captions(d.data_dir, split), encoder
