"""--mode=sample: pictures from the EMA weights of a checkpoint, or from a text-to-image
pipeline folder (`config.pretrained`).

From a checkpoint (the newest, or eval.checkpoint_step) of a diffusion run it writes
samples/sample_step_<N>.png, an .npz of the uint8 images (arr_0, the layout
guided-diffusion's evaluator reads, plus labels) and samples/reverse_step_<N>.png, the x0
predictions along the reverse process of the first images, taken from the same sampling pass;
of an autoencoder run, its reconstructions.

From a pipeline folder (Stable Diffusion v1.x layout) the prompt and the negative prompt go
through the tokenizer and CLIP's text transformer to contexts (1, 77, D); the U-Net denoises
latents with guidance between the two (the negative prompt is the unconditional side, ""
by default, as Stable Diffusion was trained with dropped captions), and the VAE decodes
them. Writes samples/prompt_<N>.png, .npz and .json.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax import errors, generation, metrics_io, objectives, parallel, validation
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import convert, create_autoencoder, create_unet
from diffusion_jax.models.clip_tokenizer import CLIPTokenizer
from diffusion_jax.models.prompts import PromptEncoder
from diffusion_jax.run import (
    checkpoint_step_arg,
    restore_ema,
    run_keys,
    schedule_from_config,
)

log = logging.getLogger(__name__)

# Sections of the user's config kept over a pipeline folder's own description.
RUN_SECTIONS = ("sampling", "training", "mesh", "eval")


def sample(config, workdir) -> Path:
    """Writes the pictures of the module doc; returns the path of the main PNG."""
    validation.validate(config, jax.device_count())
    if config.pretrained:
        return text_to_image(config, workdir)
    step, params, run = restore_ema(config, workdir, checkpoint_step_arg(config))
    _, _, sample_key = run_keys(config)
    key = jax.random.fold_in(sample_key, 2_000_000 + step)
    if not run.objective.generative:
        return run.objective.picture(run, params, key, workdir, step)
    num = config.sampling.num_samples
    labels = generation.grid_labels(config, num)
    if config_lib.is_text_conditioned(config) and config.sampling.prompt:
        labels = prompt_contexts(config, num)
    images, trajectory = run.generate(
        params, num, key, labels=labels, x0_at=generation.reverse_process_steps(config)
    )
    out_dir = metrics_io.samples_dir(workdir)
    out = out_dir / f"sample_step_{step}"
    if parallel.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(
            out.with_suffix(".npz"),
            arr_0=images,
            labels=np.asarray(labels) if np.ndim(labels) == 1 else np.zeros(0, np.int32),
        )
        rows = config.data.num_classes if config.model.class_conditional else None
        metrics_io.save_grid(out.with_suffix(".png"), metrics_io.from_uint8(images), rows=rows)
        generation.save_reverse_process(out_dir / f"reverse_step_{step}.png", trajectory)
    return out.with_suffix(".png")


def prompt_contexts(config, num: int) -> np.ndarray:
    """sampling.prompt as the network takes it (`objectives.prompt_context`), repeated:
    (num, ...)."""
    context = objectives.prompt_context(config, config.sampling.prompt)
    return np.broadcast_to(context, (num,) + context.shape[1:])


# --- text to image -------------------------------------------------------------------------


def pipeline_config(config) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config): the pipeline folder's model, diffusion, autoencoder and text encoder,
    with the sampling, seed and mesh settings of `config`; the sampling fields `config`
    leaves unset follow the folder's scheduler config (`convert.sampling_from_scheduler`)."""
    params, found = convert.from_pipeline(config.pretrained)
    merged = ml_collections.ConfigDict(found.to_dict())
    for section in RUN_SECTIONS:
        merged[section] = ml_collections.ConfigDict(config[section].to_dict())
    merged.sampling = pipeline_sampling(merged)
    validation.validate(merged, jax.device_count())
    return params, merged


def pipeline_sampling(config) -> ml_collections.ConfigDict:
    """config.sampling resolved against the scheduler config of config.pretrained."""
    scheduler = convert.read_scheduler_config(config.pretrained)
    try:
        implied = convert.sampling_from_scheduler(scheduler, config.sampling.sampler)
    except ValueError as e:
        raise errors.ConfigError(f"config.pretrained={config.pretrained}: {e}") from e
    return config_lib.resolved_sampling(config, implied)


class TextToImage(NamedTuple):
    """sampler(key, batch_size, x_T=None) -> images (B, H, W, C) in [-1, 1] of
    sampling.prompt, guided against sampling.negative_prompt."""

    config: ml_collections.ConfigDict  # the pipeline's, with the user's run sections
    mesh: Any
    sample_fn: Any
    unet_params: Any
    context: Any  # (1, M, D) of the prompt

    def __call__(self, key, batch_size: int, x_T=None):
        cond = jnp.broadcast_to(self.context, (batch_size,) + self.context.shape[1:])
        return self.sample_fn(self.unet_params, key, cond, batch_size, x_T)


def build_sampler(config) -> tuple[ml_collections.ConfigDict, TextToImage]:
    """(config of the pipeline, its `TextToImage` sampler) for config.pretrained."""
    s = config.sampling
    if not s.prompt:
        raise errors.ConfigError(
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
        ae_lib.make_decode_fn(create_autoencoder(config), config.autoencoder.scaling_factor),
        jax.device_put(params["autoencoder"], parallel.replicated(mesh)),
    )
    sample_fn = generation.make_sample_fn(
        create_unet(config),
        schedule_from_config(config),
        config,
        mesh,
        decoder=decoder,
        null_context=contexts[1:2],
    )
    unet = jax.device_put(params["unet"], parallel.replicated(mesh))
    return config, TextToImage(config, mesh, sample_fn, unet, contexts[0:1])


def text_to_image(config, workdir) -> Path:
    """Samples sampling.num_samples images of sampling.prompt (module doc)."""
    config, sampler = build_sampler(config)
    s = config.sampling
    key = jax.random.key(config.training.seed)
    t0 = time.perf_counter()
    contexts = np.broadcast_to(sampler.context, (s.num_samples,) + sampler.context.shape[1:])
    images = generation.generate(
        sampler.sample_fn,
        config,
        sampler.mesh,
        sampler.unet_params,
        s.num_samples,
        key,
        labels=contexts,
    )
    log.info(
        "sample: %d images of %r in %.1fs (%s, %d steps, guidance %.1f)",
        len(images),
        s.prompt,
        time.perf_counter() - t0,
        s.sampler,
        s.num_steps,
        s.guidance_scale,
    )
    out_dir = metrics_io.samples_dir(workdir)
    index = len(list(out_dir.glob("prompt_*.png"))) if out_dir.exists() else 0
    path = out_dir / f"prompt_{index}.png"
    if parallel.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".npz"), arr_0=images)
        metrics_io.save_grid(path, metrics_io.from_uint8(images))
        record = {
            "prompt": s.prompt,
            "negative_prompt": s.negative_prompt,
            "sampler": s.sampler,
            "num_steps": s.num_steps,
            "nfe": dm.nfe(s.sampler, s.num_steps, s.timesteps),
            "guidance_scale": s.guidance_scale,
            "seed": config.training.seed,
            "pretrained": config.pretrained,
            # The scheduler rules followed (the folder's, or the overrides).
            "scheduler": {
                key: s[key]
                for key in (*config_lib.SCHEDULER_DEFAULTS, "clip_denoised", "timesteps")
            },
        }
        path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        log.info("sample: wrote %s", path)
    return path
