"""--mode=sample for a pretrained text-to-image pipeline (Stable Diffusion v1.x layout).

The prompt and the negative prompt go through the tokenizer and CLIP's text transformer to
contexts (1, 77, D); the U-Net denoises latents with guidance between the two (the negative
prompt is the unconditional side, "" by default, as Stable Diffusion was trained with
dropped captions), and the VAE decodes them. Writes samples/prompt_<N>.png and .npz.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import latents, metrics_io, parallel
from diffusion_jax.evaluation import sampling
from diffusion_jax.models import convert, create_autoencoder, create_unet
from diffusion_jax.models.clip_tokenizer import CLIPTokenizer
from diffusion_jax.prompts import PromptEncoder

log = logging.getLogger(__name__)

# Sections of the user's config kept over the pipeline's own description.
RUN_SECTIONS = ("sampling", "training", "mesh", "eval")


def pipeline_config(config) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config): the pipeline folder's model, diffusion, autoencoder and text encoder,
    with the sampling, seed and mesh settings of `config`."""
    params, found = convert.from_pipeline(config.pretrained)
    merged = ml_collections.ConfigDict(found.to_dict())
    for section in RUN_SECTIONS:
        merged[section] = ml_collections.ConfigDict(config[section].to_dict())
    merged.sampling.clip_denoised = False
    config_lib.validate(merged, jax.device_count())
    return params, merged


def build_sampler(config):
    """(config of the pipeline, fn(key, batch_size, x_T=None) -> images (B, H, W, C) in
    [-1, 1] of sampling.prompt, guided against sampling.negative_prompt)."""
    s = config.sampling
    if not s.prompt:
        raise config_lib.ConfigError(
            "config.sampling.prompt: a text-to-image pipeline needs a prompt, e.g. "
            "--config.sampling.prompt='a photograph of an astronaut riding a horse'"
        )
    params, config = pipeline_config(config)
    mesh = parallel.make_mesh(config)
    encoder = PromptEncoder(
        params["text_encoder"],
        config.text_encoder.to_dict(),
        CLIPTokenizer.from_folder(Path(config.pretrained) / "tokenizer"),
    )
    contexts = jnp.asarray(encoder([s.prompt, s.negative_prompt]))
    decoder = (
        latents.make_decode_fn(create_autoencoder(config), config.autoencoder.scaling_factor),
        jax.device_put(params["autoencoder"], parallel.replicated(mesh)),
    )
    sample_fn = sampling.make_sample_fn(
        create_unet(config),
        sampling.schedule_from_config(config),
        config,
        mesh,
        decoder=decoder,
    )
    sample_fn.null_context = contexts[1:2]
    unet = jax.device_put(params["unet"], parallel.replicated(mesh))

    def generate(key, batch_size: int, x_T=None):
        cond = jnp.broadcast_to(contexts[0:1], (batch_size,) + contexts.shape[1:])
        return sample_fn(unet, key, cond, batch_size, x_T)

    generate.mesh = mesh
    return config, generate


def sample(config, workdir) -> Path:
    """Samples sampling.num_samples images of sampling.prompt (module doc)."""
    config, generate = build_sampler(config)
    s = config.sampling
    batch = sampling.padded_batch(min(s.batch_size, s.num_samples), generate.mesh.size)
    key = jax.random.key(config.training.seed)
    images, t0 = [], time.perf_counter()
    for i in range(-(-s.num_samples // batch)):
        out = sampling.gather(generate(jax.random.fold_in(key, i), batch))
        images.append(metrics_io.to_uint8(out))
    images = np.concatenate(images)[: s.num_samples]
    log.info(
        "sample: %d images of %r in %.1fs (%s, %d steps, guidance %.1f)",
        len(images),
        s.prompt,
        time.perf_counter() - t0,
        s.sampler,
        s.num_steps,
        s.guidance_scale,
    )
    out_dir = Path(workdir) / "samples"
    index = len(list(out_dir.glob("prompt_*.png"))) if out_dir.exists() else 0
    path = out_dir / f"prompt_{index}.png"
    if parallel.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".npz"), arr_0=images)
        metrics_io.save_grid(path, images.astype(np.float32) / 127.5 - 1.0)
        path.with_suffix(".json").write_text(
            json.dumps(
                {
                    "prompt": s.prompt,
                    "negative_prompt": s.negative_prompt,
                    "sampler": s.sampler,
                    "num_steps": s.num_steps,
                    "guidance_scale": s.guidance_scale,
                    "seed": config.training.seed,
                    "pretrained": config.pretrained,
                },
                indent=2,
            )
            + "\n"
        )
        log.info("sample: wrote %s", path)
    return path
