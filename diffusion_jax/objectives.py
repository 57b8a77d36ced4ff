"""What a run trains, chosen once: `for_config(config, sched)` picks the functions of
`config.training.objective` and binds the settings they need.

- "diffusion": the denoising network of `config.model` learns the reverse process (the
  loss of `diffusion.prediction`, `diffusion.variance` and `diffusion.loss_type`); its
  picture is a grid of samples and it is scored on samples (FID, digits_fd, bits/dim).
- "autoencoder": the KL autoencoder of `config.autoencoder` learns to reconstruct images
  through its latents; its picture shows held-out images over their reconstructions and it
  is scored on held-out reconstruction errors.

Everything else (the step, the loop, evaluation) receives an `Objective` and calls its
functions; none of it asks which objective it has.

`picture` and `scores` are handed the run they belong to (`run.RunSetup`) by their caller,
the way big_vision's trainer hands its evaluators a predict function: from it they take the
config, the mesh and the functions compiled above this layer (the run's sampler, its
reconstruction). This module imports nothing above its layer.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax import errors, metrics_io, parallel
from diffusion_jax.data import pipeline
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import factory
from diffusion_jax.models.clip_tokenizer import CLIPTokenizer
from diffusion_jax.models.prompts import PromptEncoder


class Objective(NamedTuple):
    """The functions of one training objective (module doc).

    create_model(config) -> the Flax module trained.
    init_inputs(config, batch) -> example positional inputs of that module, for init.
    batch_spec(config, batch_size, sharding) -> {name: jax.ShapeDtypeStruct} of a batch.
    draw_inputs(key, batch) -> the inputs of `loss` for a whole batch (its randomness).
    loss(params, inputs, dropout_key, *, model, train) -> (mean loss, {term: mean}).
    picture(run, params, key, workdir, step) -> Path of the PNG written for `step`.
    scores(run, params, key, score_samples) -> {name: value} of held-out evaluation;
        score_samples(images_uint8, params, key) -> {metric: value} scores generated images.
    generative: whether the model draws new samples (`--mode=sample` samples it); otherwise
        its picture is what `--mode=sample` writes.
    """

    name: str
    create_model: Callable
    init_inputs: Callable
    batch_spec: Callable
    draw_inputs: Callable
    loss: Callable
    picture: Callable
    scores: Callable
    generative: bool


# --- diffusion ---------------------------------------------------------------------------


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


def null_text_context(config):
    """The context a dropped caption becomes in a run fine-tuned from a pipeline folder: the
    empty prompt's, as Stable Diffusion was trained (and as its pipelines guide against):
    its token ids (L,) when the text encoder trains, its frozen encoder's embeddings (M, D)
    otherwise. None (zeros) for every other run."""
    if not (config.training.init_from and config_lib.is_text_conditioned(config)):
        return None
    return prompt_context(config, "")[0]


def prompt_context(config, prompts) -> np.ndarray:
    """What the network of `config` takes as the context of `prompts` (str or list): the
    embeddings (N, M, D) of text_encoder.weights, or, when the text encoder trains with the
    network, the token ids (N, L) its own encoder reads."""
    if not config.text_encoder.weights:
        raise errors.ConfigError(
            "config.text_encoder.weights: sampling.prompt needs the text encoder the model was "
            "trained with (a folder with text_encoder/ and tokenizer/)"
        )
    folder = Path(config.text_encoder.weights)
    if config.training.train_text_encoder:
        return CLIPTokenizer.from_folder(folder / "tokenizer")(prompts)
    return PromptEncoder.from_folder(folder)(prompts)


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
    result = {
        "sampler": s.sampler,
        "sampling_steps": s.num_steps,
        "nfe": dm.nfe(s.sampler, s.num_steps, s.timesteps),
        "eta": s.eta,
        "guidance_scale": s.guidance_scale,
        "seed": run.config.training.seed,
        "sampling_seconds": round(time.perf_counter() - t0, 2),
    }
    return {**result, **score_samples(images, params, key)}


# --- autoencoder -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AutoencoderSettings:
    """What the autoencoder loss and its inputs need from a config (documented in config.py)."""

    kl_weight: float
    reconstruction: str
    latent_channels: int
    downsampling: int  # image size / latent size

    @classmethod
    def from_config(cls, config) -> AutoencoderSettings:
        a = config.autoencoder
        return cls(
            kl_weight=a.kl_weight,
            reconstruction=a.reconstruction,
            latent_channels=a.latent_channels,
            downsampling=ae_lib.downsampling_factor(a.ch_mult),
        )


def draw_autoencoder_inputs(key, batch, *, settings):
    """The images and the noise of the posterior sample z = mean + std * noise."""
    x0 = batch["image"]
    b, h, w, _ = x0.shape
    f = settings.downsampling
    noise = jax.random.normal(key, (b, h // f, w // f, settings.latent_channels), jnp.float32)
    return {"x0": x0, "noise": noise}


def autoencoder_loss(params, inputs, dropout_key, *, model, settings, train=True):
    """Mean `autoencoder_loss` over a (micro-)batch and its mean terms (no dropout)."""
    del dropout_key, train
    x_hat, mean, logvar = model.apply({"params": params}, inputs["x0"], inputs["noise"])
    loss, terms = ae_lib.autoencoder_loss(
        inputs["x0"],
        x_hat,
        mean,
        logvar,
        kl_weight=settings.kl_weight,
        reconstruction=settings.reconstruction,
    )
    return loss.mean(), {k: v.mean() for k, v in terms.items()}


def autoencoder_init_inputs(config, batch: int = 1) -> tuple:
    d, a = config.data, config.autoencoder
    return ae_lib.autoencoder_inputs(
        d.image_size, d.channels, a.ch_mult, a.latent_channels, batch=batch
    )


def autoencoder_batch_spec(config, batch_size: int, sharding=None) -> dict:
    """Images at data.image_size (the autoencoder sees pixels) and labels."""
    d = config.data
    return _image_batch_spec(batch_size, d.image_size, d.channels, sharding)


def reconstruct(model, params, x):
    """Decoded posterior means of images x (B, H, W, C), clipped to [-1, 1]."""
    mean, _ = model.apply({"params": params}, x, method=model.encode)
    return jnp.clip(model.apply({"params": params}, mean, method=model.decode), -1.0, 1.0)


def reconstruction_picture(run, params, key, workdir, step, num: int = 32):
    """samples/reconstructions_step_<step>.png: rows of held-out images over their
    reconstructions (decoded posterior means)."""
    del key
    config = run.config
    path = metrics_io.samples_dir(workdir) / f"reconstructions_step_{step}.png"
    batch = parallel.padded_batch(num, run.mesh.size)
    images = next(
        pipeline.create_iterator(
            config, run.mesh, split=config.data.eval_split, global_batch=batch, train=False
        )
    )["image"]
    recon = parallel.gather(run.reconstruct_fn()(params, images))[:num]
    images = parallel.gather(images)[:num]
    per_row = 8
    rows = [
        half[i : i + per_row]
        for i in range(0, num - per_row + 1, per_row)
        for half in (images, recon)
    ]
    metrics_io.save_grid(path, np.concatenate(rows), rows=len(rows))
    return path


def reconstruction_scores(run, params, key, score_samples) -> dict:
    """An autoencoder's held-out errors over eval.num_samples images of data.eval_split: MSE
    and L1 of the decoded posterior mean, PSNR (images in [-1, 1], peak-to-peak 2), and the
    MSE of the blur baseline (`autoencoder.blur_baseline` at the latent resolution)."""
    del key, score_samples
    config = run.config
    factor = ae_lib.downsampling_factor(config.autoencoder.ch_mult)
    batch = parallel.padded_batch(
        min(config.sampling.batch_size, config.eval.num_samples), run.mesh.size
    )
    batches = pipeline.create_iterator(
        config, run.mesh, split=config.data.eval_split, global_batch=batch, train=False
    )
    reconstruct_fn = run.reconstruct_fn()
    blur = jax.jit(lambda x: ae_lib.blur_baseline(x, factor))

    def per_image(error):
        return error.reshape(error.shape[0], -1).mean(axis=1)

    mse, l1, blur_mse = [], [], []
    for _ in range(-(-config.eval.num_samples // batch)):
        x = next(batches)["image"]
        x_hat, x_blur = parallel.gather(reconstruct_fn(params, x)), parallel.gather(blur(x))
        x = parallel.gather(x)
        mse.append(per_image((x - x_hat) ** 2))
        l1.append(per_image(np.abs(x - x_hat)))
        blur_mse.append(per_image((x - x_blur) ** 2))
    num = config.eval.num_samples
    mse, l1, blur_mse = (np.concatenate(v)[:num] for v in (mse, l1, blur_mse))
    return {
        "reconstruction_mse": float(mse.mean()),
        "reconstruction_l1": float(l1.mean()),
        "psnr": float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-12)))),
        "blur_mse": float(blur_mse.mean()),
    }


# --- the choice ----------------------------------------------------------------------------


def _image_batch_spec(batch_size, size, channels, sharding) -> dict[str, Any]:
    return {
        "image": jax.ShapeDtypeStruct(
            (batch_size, size, size, channels), jnp.float32, sharding=sharding
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
    }


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


def autoencoder(config, sched=None) -> Objective:
    del sched  # the autoencoder has no noise schedule
    settings = AutoencoderSettings.from_config(config)
    return Objective(
        name="autoencoder",
        create_model=ae_lib.create_autoencoder,
        init_inputs=autoencoder_init_inputs,
        batch_spec=autoencoder_batch_spec,
        draw_inputs=functools.partial(draw_autoencoder_inputs, settings=settings),
        loss=functools.partial(autoencoder_loss, settings=settings),
        picture=reconstruction_picture,
        scores=reconstruction_scores,
        generative=False,
    )


OBJECTIVES = {"diffusion": diffusion, "autoencoder": autoencoder}


def for_config(config, sched) -> Objective:
    """The objective of config.training.objective, its settings bound (module doc)."""
    return OBJECTIVES[config.training.objective](config, sched)
