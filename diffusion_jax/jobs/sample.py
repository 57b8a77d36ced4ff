"""--mode=sample: pictures from the EMA weights of a checkpoint, or from a text-to-image
pipeline folder (`config.pretrained`).

From a checkpoint (the newest, or eval.checkpoint_step) of a diffusion run it writes
samples/sample_step_<N>.png, an .npz of the uint8 images (arr_0, the layout
guided-diffusion's evaluator reads, plus labels and what made them: sampler, nfe, ema, step,
seed, guidance_scale), a .json of the same record, and samples/reverse_step_<N>.png, the x0
predictions along the reverse process of the first images, taken from the same sampling
pass; of an autoencoder run, its reconstructions. The name says which weights
(`weights.ema_file_name`: sample_sigma_rel_<w>_step_<N> for a power-function EMA,
sample_file_<name> for eval.params_file), and other sampling settings than those already
written there get -<settings> appended: no run overwrites another's pictures.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import errors, generation, metrics_io, parallel, paths, weights
from diffusion_jax.evaluation.evaluate import settings_key
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import create_autoencoder, create_unet, prompts
from diffusion_jax.models.clip_tokenizer import CLIPTokenizer
from diffusion_jax.models.prompts import PromptEncoder
from diffusion_jax.run import run_keys, schedule_from_config, setup_run

log = logging.getLogger(__name__)


def sample(config, workdir) -> paths.Path:
    """Writes the pictures of the module doc; returns the path of the main PNG."""
    if config.pretrained:
        return text_to_image(config, workdir)
    run = setup_run(config, run_keys(config)[0])
    step, params = weights.job_params(config, workdir, run, weights.checkpoint_step_arg(config))
    _, _, sample_key = run_keys(config)
    key = jax.random.fold_in(sample_key, 2_000_000 + step)
    if not run.objective.generative:
        return run.objective.picture(run, params, key, workdir, step)
    num = config.sampling.num_samples
    labels = generation.grid_labels(config, num)
    if config_lib.is_text_conditioned(config) and config.sampling.prompt:
        labels = prompt_contexts(config, num)
    t0 = time.perf_counter()
    images, trajectory = run.generate(
        params, num, key, labels=labels, x0_at=generation.reverse_process_steps(config)
    )
    record = {
        "step": None if config.eval.params_file else step,
        "ema": weights.describe(config, step),
        **config_lib.sample_settings(config).record(),
        "guidance_scale": _guidance(config),
        "num_samples": num,
        "seed": config.training.seed,
        "settings": settings_key(config),
    }
    out = _free_stem(metrics_io.samples_dir(workdir), weights.ema_file_name(config, step), record)
    log.info(
        "sample: %d images in %.1fs from %s with %s, NFE %d, guidance %s -> %s",
        len(images),
        time.perf_counter() - t0,
        record["ema"],
        record["sampler"],
        record["nfe"],
        record["guidance_scale"],
        _file(out, ".png"),
    )
    if parallel.is_main_process():
        meta = {k: np.asarray("" if v is None else v) for k, v in record.items()}
        paths.save_npz(
            _file(out, ".npz"),
            arr_0=images,
            labels=np.asarray(labels) if np.ndim(labels) == 1 else np.zeros(0, np.int32),
            **meta,
        )
        paths.write_text(_file(out, ".json"), json.dumps(record, indent=2) + "\n")
        rows = config.data.num_classes if config.model.class_conditional else None
        metrics_io.save_grid(_file(out, ".png"), metrics_io.from_uint8(images), rows=rows)
        reverse = out.parent / out.name.replace("sample_", "reverse_", 1)
        generation.save_reverse_process(_file(reverse, ".png"), trajectory)
    return _file(out, ".png")


def _guidance(config) -> float | None:
    """The guidance weight sampling applies: None without labels or for w < 0."""
    w = config.sampling.guidance_scale
    guided = config.model.class_conditional or config_lib.is_text_conditioned(config)
    return float(w) if guided and w >= 0 else None


def _file(stem: paths.Path, extension: str) -> paths.Path:
    """stem + extension: a width's stem holds a dot (sigma_rel_0.0700_...), which
    Path.with_suffix would take for the suffix."""
    return stem.with_name(stem.name + extension)


def _free_stem(folder: paths.Path, ema_stem: str, record: dict) -> paths.Path:
    """samples/sample_<what>: sample_step_<N> for a checkpoint's exponential EMA (the other
    averages and files by `weights.ema_file_name`), with -<settings> appended when that name
    holds samples of other settings, so that no sampling run overwrites another's."""
    plain = folder / f"sample_{ema_stem.removeprefix('ema_')}"
    try:
        same = json.loads(_file(plain, ".json").read_text()).get("settings")
    except (OSError, ValueError):
        same = None if _file(plain, ".png").exists() else record["settings"]
    if same == record["settings"]:
        return plain
    return plain.with_name(f"{plain.name}-{record['settings']}")


def prompt_contexts(config, num: int) -> np.ndarray:
    """sampling.prompt as the network takes it (`prompts.prompt_context`), repeated:
    (num, ...)."""
    context = prompts.prompt_context(config, config.sampling.prompt)
    return np.broadcast_to(context, (num,) + context.shape[1:])


# --- text to image -------------------------------------------------------------------------


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


def build_sampler(config) -> TextToImage:
    """The `TextToImage` sampler of the pipeline folder config.pretrained; `config` is the
    resolved text-to-image config (`preflight.resolve(..., "sample")`)."""
    s = config.sampling
    if not s.prompt:
        raise errors.ConfigError(
            "config.sampling.prompt: a text-to-image pipeline needs a prompt, e.g. "
            "--config.sampling.prompt='a photograph of an astronaut riding a horse'"
        )
    params = weights.pipeline_params(config.pretrained)
    mesh = parallel.make_mesh(config)
    encoder = PromptEncoder(
        params["text_encoder"],
        config.text_encoder.to_dict(),
        CLIPTokenizer.from_folder(paths.local(config.pretrained) / "tokenizer"),
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
    return TextToImage(config, mesh, sample_fn, unet, contexts[0:1])


def text_to_image(config, workdir) -> paths.Path:
    """Samples sampling.num_samples images of sampling.prompt (module doc)."""
    sampler = build_sampler(config)
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
        paths.save_npz(path.with_suffix(".npz"), arr_0=images)
        metrics_io.save_grid(path, metrics_io.from_uint8(images))
        record = {
            "prompt": s.prompt,
            "negative_prompt": s.negative_prompt,
            **config_lib.sample_settings(config).record(),  # sampler, num_steps, nfe
            "guidance_scale": s.guidance_scale,
            "seed": config.training.seed,
            "pretrained": config.pretrained,
            # The scheduler rules followed (the folder's, or the overrides).
            "scheduler": {
                key: s[key]
                for key in (*config_lib.SCHEDULER_DEFAULTS, "clip_denoised", "timesteps")
            },
        }
        paths.write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
        log.info("sample: wrote %s", path)
    return path
