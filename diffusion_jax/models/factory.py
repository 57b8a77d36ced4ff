"""Networks built from a run config, their example inputs, and their parameter shapes.

Each network is built from its config section by a `Network` table entry (UNET of
config.model, DIT of config.model.dit, TEXT_ENCODER of config.text_encoder; AUTOENCODER of
config.autoencoder in autoencoder.py): every field of the module with the name of a field of
the section comes straight from it (a list as a tuple); a small `derived` table gives the
fields computed from elsewhere (the output channels, the classes, the dtype object...);
`not_its` names the section's fields the module does not take, and a section field that is
none of these is a ConfigError, not silently dropped. A new network option is therefore one module
field plus the config field of the same name in `base_config` (with its comment);
tests/test_model_config.py checks that the tables, the modules and base_config agree.

`create_model` builds the denoising network of `config.model` (`create_unet` or
`create_dit`, by model.arch; with the text encoder when that trains too),
`create_text_encoder` CLIP's text encoder of `config.text_encoder`; `init_inputs` gives the
denoiser's example inputs and `abstract_params` the parameter shapes of any model for given
example inputs, without allocating the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.config import model_input_shape
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.text_denoiser import TextTrainedDenoiser
from diffusion_jax.models.text_encoder import CLIPTextEncoder
from diffusion_jax.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class Network:
    """How `module` is built from the config section at `section` (a dotted path):
    `module(**{f: section[f] for f in taken}, **{f: fn(config) for f, fn in derived})`.

    taken: the module's fields that are neither derived nor in `defaults`, each read from
    the section field of the same name (a list as a tuple: module fields are hashable).
    derived: module field -> fn(config), for the fields computed from other config fields
    (a derived field replaces a section field of the same name, e.g. dtype from its string).
    not_its: the section's fields the module does not take (inputs of derived fields, other
    networks' fields, run settings). defaults: module fields left at their default.
    """

    module: type[nn.Module]
    section: str
    derived: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)
    not_its: tuple[str, ...] = ()
    defaults: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """The module's own fields (flax's parent and name aside)."""
        return tuple(
            f.name for f in dataclasses.fields(self.module) if f.name not in ("parent", "name")
        )

    @property
    def taken(self) -> tuple[str, ...]:
        """The module fields read straight from the section."""
        return tuple(f for f in self.fields if f not in self.derived and f not in self.defaults)

    def __call__(self, config) -> nn.Module:
        section = functools.reduce(lambda c, key: c[key], self.section.split("."), config)
        taken = self.taken
        for key in section:
            if key not in taken and key not in self.derived and key not in self.not_its:
                name = self.module.__name__
                raise ConfigError(
                    f"config.{self.section}.{key}: {name} takes no such field; add it to "
                    f"{name}, or the name to the not_its of its Network table"
                )
        fields = {k: _hashable(section[k]) for k in taken}
        return self.module(**fields, **{k: fn(config) for k, fn in self.derived.items()})


def _hashable(value):
    return tuple(value) if isinstance(value, list | tuple) else value


def out_channels(config) -> int:
    """The channels of the model input (`model_input_shape`: images, or latents in a latent
    run), doubled by model.learn_sigma (mean and variance outputs)."""
    _, channels = model_input_shape(config)
    return channels * (2 if config.model.learn_sigma else 1)


def model_dtype(config):
    """The activations' dtype of config.model.dtype (parameters are always float32)."""
    return jnp.dtype(config.model.dtype)


# The fields both denoisers compute from the config rather than read from their section.
DENOISER_DERIVED = {
    "out_channels": out_channels,
    "num_classes": lambda c: c.data.num_classes if c.model.class_conditional else 0,
    "use_dot_product_attention": lambda c: c.model.attention == "dot_product_attention",
    "dtype": model_dtype,
}
UNET = Network(
    UNet,
    "model",
    DENOISER_DERIVED,
    # context_length: the length of the data's text contexts; dit: the DiT's section.
    not_its=("arch", "learn_sigma", "class_conditional", "attention", "context_length", "dit"),
)
# The label table gets its null row when training drops labels, as in the original DiT;
# dropout and remat are the model section's, shared with the U-Net.
DIT = Network(
    DiT,
    "model.dit",
    {
        **DENOISER_DERIVED,
        "null_class": lambda c: c.training.cond_drop_prob > 0,
        "dropout": lambda c: c.model.dropout,
        "remat": lambda c: c.model.remat,
    },
)
# weights: the folder it is read from. dtype stays float32 whatever model.dtype.
TEXT_ENCODER = Network(CLIPTextEncoder, "text_encoder", not_its=("weights",), defaults=("dtype",))


def create_unet(config) -> UNet:
    """The U-Net described by `config.model` (UNET) for the model input of
    `model_input_shape` (images, or latents in a latent run)."""
    return UNET(config)


def create_dit(config) -> DiT:
    """The DiT described by `config.model.dit` (DIT) for the model input of
    `model_input_shape`."""
    return DIT(config)


ARCHS = {"unet": create_unet, "dit": create_dit}


def create_model(config) -> UNet | DiT | TextTrainedDenoiser:
    """The denoising network of `config.model` (model.arch: the U-Net or the DiT), whatever
    training.objective says: the network of an autoencoder run is `create_autoencoder`, and
    `objectives.for_config` picks between the two. With training.train_text_encoder it is
    trained together with the text encoder of `config.text_encoder` (`TextTrainedDenoiser`)."""
    denoiser = ARCHS[config.model.arch](config)
    if config.training.train_text_encoder:
        return TextTrainedDenoiser(unet=denoiser, text_encoder=create_text_encoder(config))
    return denoiser


def create_text_encoder(config) -> CLIPTextEncoder:
    """CLIP's text encoder described by `config.text_encoder` (TEXT_ENCODER): tokens (B, L)
    -> (B, L, width)."""
    return TEXT_ENCODER(config)


def init_inputs(config, batch: int = 1) -> tuple:
    """Example positional inputs (x, t, labels) of the network of `create_model(config)`, for
    init and shape evaluation: x (B, S, S, C) zeros for (S, C) = `model_input_shape(config)`,
    t (B,) int32 zeros, labels (B,) int32 zeros for a class-conditional model, else None."""
    size, channels = model_input_shape(config)
    labels = jnp.zeros((batch,), jnp.int32) if config.model.class_conditional else None
    return jnp.zeros((batch, size, size, channels)), jnp.zeros((batch,), jnp.int32), labels


def abstract_params(model: nn.Module, *inputs, boxed: bool = False):
    """The "params" collection `model.init(key, *inputs)` would make, as a tree of
    jax.ShapeDtypeStruct: shapes without allocating (or computing) the parameters.

    Unboxed by default; `boxed=True` keeps flax's LogicallyPartitioned boxes, which carry the
    logical axis names a caller needs to shard the parameters.
    """
    shapes = jax.eval_shape(lambda k: model.init(k, *inputs), jax.random.key(0))["params"]
    return shapes if boxed else nn.unbox(shapes)
