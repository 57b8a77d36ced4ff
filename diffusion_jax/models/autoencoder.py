"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

An image x (B, H, W, C) in [-1, 1] is encoded to the diagonal Gaussian q(z|x) = N(mean,
exp(logvar)) over latents (B, H/f, W/f, latent_channels), f = 2^(len(ch_mult) - 1), and a
latent is decoded back to an image. The diffusion model works on `scaling_factor * z`, which
brings the latents to roughly unit variance (0.18215 for Stable Diffusion's VAE).

Submodule names follow diffusers' AutoencoderKL, so published weights import by renaming
and transposing (`convert/autoencoder.py`). `make_encode_fn` and `make_decode_fn` are the
two directions a latent run uses (encoding its data once, decoding its samples).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import parallel
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import factory, layers

Dtype = Any
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' clamp of the posterior log-variance


class _Stack(nn.Module):
    """Fields shared by the encoder and the decoder."""

    ch_mult: tuple[int, ...]
    ch: int
    num_res_blocks: int
    norm_groups: int
    norm_eps: float
    mid_attention: bool
    dtype: Dtype

    def resnet(self, out_channels, name):
        return layers.ResnetBlock(
            out_channels, 0.0, False, None, self.norm_groups, self.norm_eps, self.dtype, name=name
        )

    def mid_block(self, h):
        h = self.resnet(h.shape[-1], "mid_block.resnets_0")(h, None, False)
        if self.mid_attention:
            h = layers.AttentionBlock(
                1,
                -1,
                self.norm_groups,
                self.norm_eps,
                True,
                self.dtype,
                name="mid_block.attentions_0",
            )(h)
        return self.resnet(h.shape[-1], "mid_block.resnets_1")(h, None, False)

    def out(self, h, channels):
        norm = layers.group_norm(
            "conv_norm_out", groups=self.norm_groups, eps=self.norm_eps, dtype=self.dtype
        )
        return layers.conv(channels, "conv_out", dtype=self.dtype)(nn.swish(norm(h)))


class Encoder(_Stack):
    """x (B, H, W, C) -> Gaussian moments (B, H/f, W/f, 2 * latent_channels)."""

    out_channels: int = 8

    @nn.compact
    def __call__(self, x):
        h = layers.conv(self.ch * self.ch_mult[0], "conv_in", dtype=self.dtype)(x)
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            for block in range(self.num_res_blocks):
                h = self.resnet(self.ch * mult, f"down_blocks_{level}.resnets_{block}")(
                    h, None, False
                )
            if level != last:
                h = layers.Downsample(
                    h.shape[-1], 0, self.dtype, name=f"down_blocks_{level}.downsamplers_0"
                )(h)
        return self.out(self.mid_block(h), self.out_channels)


class Decoder(_Stack):
    """z (B, h, w, latent_channels) -> image (B, h f, w f, out_channels)."""

    out_channels: int = 3

    @nn.compact
    def __call__(self, z):
        h = layers.conv(self.ch * self.ch_mult[-1], "conv_in", dtype=self.dtype)(z)
        h = self.mid_block(h)
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(reversed(self.ch_mult)):
            for block in range(self.num_res_blocks + 1):
                h = self.resnet(self.ch * mult, f"up_blocks_{level}.resnets_{block}")(
                    h, None, False
                )
            if level != last:
                h = layers.Upsample(
                    h.shape[-1], self.dtype, name=f"up_blocks_{level}.upsamplers_0"
                )(h)
        return self.out(h, self.out_channels)


def _one_by_one(features, dtype):
    return layers.conv(features, None, kernel=1, padding=0, dtype=dtype)


class AutoencoderKL(nn.Module):
    """encode: x -> (mean, logvar); decode: z -> x_hat; __call__: the training forward pass.

    Layout as diffusers: encoder, quant_conv (1x1 on the moments), post_quant_conv (1x1 on
    z), decoder.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    image_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        stack = dict(
            ch_mult=tuple(self.ch_mult),
            ch=self.ch,
            num_res_blocks=self.num_res_blocks,
            norm_groups=self.norm_groups,
            norm_eps=self.norm_eps,
            mid_attention=self.mid_attention,
            dtype=self.dtype,
        )
        self.encoder = Encoder(**stack, out_channels=2 * self.latent_channels)
        self.decoder = Decoder(**stack, out_channels=self.image_channels)
        self.quant_conv = _one_by_one(2 * self.latent_channels, self.dtype)
        self.post_quant_conv = _one_by_one(self.latent_channels, self.dtype)

    def encode(self, x):
        """x (B, H, W, C) -> (mean, logvar), each (B, H/f, W/f, latent_channels) float32."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """z (B, h, w, latent_channels) -> image (B, h f, w f, C) float32."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x, noise):
        """Reconstruction through a posterior sample z = mean + exp(logvar / 2) * noise.

        noise: (B, H/f, W/f, latent_channels) standard normal. Returns (x_hat, mean, logvar).
        """
        mean, logvar = self.encode(x)
        return self.decode(mean + jnp.exp(0.5 * logvar) * noise), mean, logvar


def kl_to_standard_normal(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar),
    summed over every axis but the first: (B, ...) -> (B,)."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return kl.reshape(kl.shape[0], -1).sum(axis=1)


def autoencoder_loss(x, x_hat, mean, logvar, *, kl_weight: float, reconstruction: str = "l1"):
    """Latent diffusion's KL-autoencoder objective without the perceptual and adversarial terms,
    per image element: (||x - x_hat||_1 + kl_weight KL(q(z|x) || N(0, I))) / (H W C).

    (LDM sums both terms over the image; dividing by the pixel count keeps kl_weight's meaning
    and gives a loss on the scale of a per-pixel error.) Returns (loss (B,), terms).
    """
    error = jnp.abs(x - x_hat) if reconstruction == "l1" else jnp.square(x - x_hat)
    per_image = error.reshape(x.shape[0], -1)
    pixels = per_image.shape[1]
    kl = kl_to_standard_normal(mean, logvar)
    loss = per_image.mean(axis=1) + kl_weight * kl / pixels
    mse = jnp.square(x - x_hat).reshape(x.shape[0], -1).mean(axis=1)
    return loss, {"reconstruction": per_image.mean(axis=1), "kl": kl, "mse": mse}


def downsampling_factor(ch_mult) -> int:
    return 2 ** (len(ch_mult) - 1)


# The autoencoder of config.autoencoder: its images' channels are the data's, its dtype the
# model's; weights is where it is read from, the rest the training objective's.
AUTOENCODER = factory.Network(
    AutoencoderKL,
    "autoencoder",
    {"image_channels": lambda c: c.data.channels, "dtype": factory.model_dtype},
    not_its=("weights", "scaling_factor", "kl_weight", "reconstruction"),
)


def create_autoencoder(config) -> AutoencoderKL:
    """The autoencoder described by `config.autoencoder` (AUTOENCODER) for images of
    `config.data.channels`."""
    return AUTOENCODER(config)


def autoencoder_inputs(
    image_size: int, image_channels: int, ch_mult, latent_channels: int, batch: int = 1
) -> tuple:
    """Example positional inputs (x, noise) of `AutoencoderKL.__call__`, for init and shape
    evaluation: zeros x (B, H, W, C) and noise (B, H/f, W/f, latent_channels), with
    H = W = image_size, C = image_channels and f = downsampling_factor(ch_mult)."""
    latent = image_size // downsampling_factor(ch_mult)
    return (
        jnp.zeros((batch, image_size, image_size, image_channels)),
        jnp.zeros((batch, latent, latent, latent_channels)),
    )


def blur_baseline(images, factor: int):
    """The images average-pooled by `factor` and resized back (bilinear): what a latent grid
    of the same spatial size could carry with no learning at all. (B, H, W, C) -> same."""
    b, h, w, c = images.shape
    pooled = nn.avg_pool(images, (factor, factor), strides=(factor, factor))
    return jax.image.resize(pooled, (b, h, w, c), "bilinear")


# Fields of config.autoencoder that define the network (those AutoencoderKL reads from it);
# weights must agree on every one.
ARCHITECTURE_FIELDS = AUTOENCODER.taken


def check_architecture(config, found: dict, source) -> None:
    """Refuses weights whose autoencoder (`found`, config.autoencoder fields) differs from
    config.autoencoder, naming the first field that differs and where the weights are."""
    for key in ARCHITECTURE_FIELDS:
        want, have = config.autoencoder[key], found[key]
        if isinstance(want, list | tuple):
            want, have = tuple(want), tuple(have)
        if want != have:
            raise ConfigError(
                f"config.autoencoder.{key}: {want!r} differs from {have!r} of the autoencoder "
                f"in {source}"
            )


def make_encode_fn(model: AutoencoderKL, scaling_factor: float, mesh):
    """jitted (params, images (B, H, W, C)) -> scaling_factor * posterior mean
    (B, H/f, W/f, latent_channels), split over the mesh's batch axes."""
    sharding = parallel.batch_sharding(mesh)

    def encode(params, images):
        mean, _ = model.apply({"params": params}, images, method=model.encode)
        return scaling_factor * mean

    return jax.jit(encode, in_shardings=(None, sharding), out_shardings=sharding)


def make_decode_fn(model: AutoencoderKL, scaling_factor: float):
    """(params, latents (..., h, w, c)) -> images (..., h f, w f, C) in [-1, 1]: the decoder
    of latents / scaling_factor; leading axes are flattened into one batch."""

    def decode(params, latents):
        lead = latents.shape[:-3]
        flat = latents.reshape((-1,) + latents.shape[-3:]) / scaling_factor
        images = model.apply({"params": params}, flat, method=model.decode)
        return jnp.clip(images, -1.0, 1.0).reshape(lead + images.shape[1:])

    return decode
