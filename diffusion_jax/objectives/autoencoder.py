"""The autoencoder objective: the KL autoencoder of `config.autoencoder` learns to
reconstruct images through its latents; its picture shows held-out images over their
reconstructions and it is scored on held-out reconstruction errors."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import metrics_io, parallel
from diffusion_jax.data import pipeline
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.objectives.base import Objective, _image_batch_spec


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
