"""The diffusion objective: the denoising network of `config.model` learns the reverse
process (the loss of `diffusion.prediction`, `diffusion.variance` and `diffusion.loss_type`);
its picture is a grid of samples and it is scored on samples (FID, digits_fd, bits/dim)."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax import metrics_io
from diffusion_jax.models import factory
from diffusion_jax.models.prompts import null_text_context
from diffusion_jax.objectives.base import Objective, _image_batch_spec


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    """What the diffusion loss and its inputs need from a config (documented in config.py)."""

    prediction: str
    variance: str
    loss_type: str
    loss_weighting: str
    min_snr_gamma: float
    num_classes: int  # > 0: class-conditional, with the null label `num_classes`
    cond_drop_prob: float
    # () -> what a dropped text context becomes (`null_text_context`), called when the train
    # step is traced (other jobs never load the text encoder for it); None: zeros.
    null_context: Any = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_config(cls, config) -> DiffusionSettings:
        f = config.diffusion
        return cls(
            prediction=f.prediction,
            variance=f.variance,
            loss_type=f.loss_type,
            loss_weighting=f.loss_weighting,
            min_snr_gamma=f.min_snr_gamma,
            num_classes=config.data.num_classes if config.model.class_conditional else 0,
            cond_drop_prob=config.training.cond_drop_prob,
            null_context=_null_context_fn(config),
        )


def _null_context_fn(config):
    if not (config.training.cond_drop_prob and config.training.init_from):
        return None
    return functools.cache(functools.partial(null_text_context, config))


def draw_step_inputs(
    key, batch, sched, *, num_classes: int, cond_drop_prob: float, null_context=None
):
    """The randomness of one diffusion step for the whole batch: t ~ U{0..T-1}, eps ~ N(0, I),
    and the conditioning with a fraction `cond_drop_prob` dropped: class labels replaced by
    the null label `num_classes`, text contexts (batch["context"]: embeddings (B, M, D) or
    token ids (B, L)) by `null_context` (one context, without the batch axis), or zeros.

    Drawn for the whole global batch before any micro-batching, so that gradient
    accumulation sees exactly the examples one large step would.
    """
    x0 = batch["image"]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = dm.sample_timesteps(k_t, x0.shape[0], sched.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    drop = jax.random.bernoulli(k_drop, cond_drop_prob, (x0.shape[0],))
    labels = context = None
    if num_classes > 0:
        labels = batch["label"]
        if cond_drop_prob > 0:
            labels = jnp.where(drop, num_classes, labels)
    if "context" in batch:
        context = batch["context"]
        if null_context is not None:
            null = jnp.asarray(null_context, context.dtype)
        elif jnp.issubdtype(context.dtype, jnp.integer):
            raise ValueError("draw_step_inputs: dropping token ids needs the null prompt's ids")
        else:
            null = jnp.zeros(context.shape[1:], context.dtype)
        context = jnp.where(drop.reshape((-1,) + (1,) * (context.ndim - 1)), null, context)
    return {"x0": x0, "t": t, "noise": noise, "labels": labels, "context": context}


def diffusion_loss(params, inputs, dropout_key, *, model, sched, settings, train=True):
    """Mean diffusion loss over a (micro-)batch at x_t = q_sample(x0, t, noise), and its mean
    terms (`dm.diffusion_loss`)."""
    s = settings
    x_t = dm.q_sample(sched, inputs["x0"], inputs["t"], inputs["noise"])
    out = model.apply(
        {"params": params},
        x_t,
        inputs["t"],
        inputs["labels"],
        train=train,
        context=inputs["context"],
        rngs={"dropout": dropout_key},
    )
    loss, terms = dm.diffusion_loss(
        sched,
        out,
        inputs["x0"],
        x_t,
        inputs["t"],
        inputs["noise"],
        prediction=s.prediction,
        variance=s.variance,
        loss_type=s.loss_type,
        weighting=s.loss_weighting,
        min_snr_gamma=s.min_snr_gamma,
    )
    return loss.mean(), {k: v.mean() for k, v in terms.items()}


def diffusion_batch_spec(config, batch_size: int, sharding=None) -> dict:
    """Images (or latents, in a latent run), labels, and the text context of text models."""
    size, channels = config_lib.model_input_shape(config)
    spec = _image_batch_spec(batch_size, size, channels, sharding)
    m = config.model
    if config.training.train_text_encoder:  # caption tokens, encoded in the step
        spec["context"] = jax.ShapeDtypeStruct(
            (batch_size, m.context_length), jnp.int32, sharding=sharding
        )
    elif config_lib.is_text_conditioned(config):
        spec["context"] = jax.ShapeDtypeStruct(
            (batch_size, m.context_length, m.context_dim), jnp.float32, sharding=sharding
        )
    return spec


def sample_picture(run, params, key, workdir, step):
    """samples/step_<step>.png: a grid of sampling.num_samples samples and its .npz."""
    path = metrics_io.samples_dir(workdir) / f"step_{step}.png"
    run.write_samples(params, key, path)
    return path


def sample_scores(run, params, key, score_samples) -> dict:
    """eval.num_samples samples drawn with the configured sampler, scored by `score_samples`,
    with the sampler settings and the time they took."""
    s, num = run.config.sampling, run.config.eval.num_samples
    t0 = time.perf_counter()
    images = run.generate(params, num, key, progress_every=5)
    record = config_lib.sample_settings(run.config).record()
    result = {
        "sampler": record["sampler"],
        "sampling_steps": record["num_steps"],  # the results' name for the budget
        "nfe": record["nfe"],
        "eta": s.eta,
        "guidance_scale": s.guidance_scale,
        "seed": run.config.training.seed,
        "sampling_seconds": round(time.perf_counter() - t0, 2),
    }
    return {**result, **score_samples(images, params, key)}


def diffusion(config, sched) -> Objective:
    settings = DiffusionSettings.from_config(config)
    return Objective(
        name="diffusion",
        create_model=factory.create_model,
        init_inputs=factory.init_inputs,
        batch_spec=diffusion_batch_spec,
        draw_inputs=functools.partial(_draw_diffusion_inputs, sched=sched, settings=settings),
        loss=functools.partial(diffusion_loss, sched=sched, settings=settings),
        picture=sample_picture,
        scores=sample_scores,
        generative=True,
    )


def _draw_diffusion_inputs(key, batch, *, sched, settings):
    return draw_step_inputs(
        key,
        batch,
        sched,
        num_classes=settings.num_classes,
        cond_drop_prob=settings.cond_drop_prob,
        null_context=settings.null_context() if settings.null_context else None,
    )
