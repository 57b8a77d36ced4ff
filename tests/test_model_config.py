"""The networks' config sections, their modules and the factory tables name the same fields.

Each network is built from its section by a `factory.Network` table: module fields read from
the section field of the same name, a small `derived` table, the section fields named as not
the module's (`not_its`) and the module fields left at their default. These tests tie the
name lists together (base_config, the modules' dataclass fields, the tables, the other name
lists of the same things) and check the built modules against a second formula written
here, field by field, on a few recipes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import objectives
from diffusion_jax.config import base_config
from diffusion_jax.errors import ConfigError
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import factory, prompts
from diffusion_jax.models.autoencoder import AutoencoderKL
from diffusion_jax.models.convert import text_encoder as convert_text
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.text_denoiser import TextTrainedDenoiser
from diffusion_jax.models.text_encoder import CLIPTextEncoder
from diffusion_jax.models.unet import UNet

CONFIGS = Path(__file__).parents[1] / "configs"

NETWORKS = {
    "unet": (factory.UNET, UNet, "model"),
    "dit": (factory.DIT, DiT, "model.dit"),
    "text_encoder": (factory.TEXT_ENCODER, CLIPTextEncoder, "text_encoder"),
    "autoencoder": (ae_lib.AUTOENCODER, AutoencoderKL, "autoencoder"),
}
# Module fields no config field sets, on purpose: the text encoder computes in float32
# whatever model.dtype (Stable Diffusion's contexts are float32; it was never configurable).
MODULE_DEFAULTS = {"text_encoder": ("dtype",)}


def section(config, path):
    for key in path.split("."):
        config = config[key]
    return config


def module_fields(module) -> set[str]:
    return set(module.__dataclass_fields__) - {"parent", "name"}


@pytest.mark.parametrize("name", NETWORKS)
def test_table_names_the_module_and_its_section(name):
    table, module, path = NETWORKS[name]
    assert table.module is module and table.section == path
    assert table.defaults == MODULE_DEFAULTS.get(name, ())


@pytest.mark.parametrize("name", NETWORKS)
def test_every_section_field_is_the_modules_or_named_as_not_its(name):
    table, module, path = NETWORKS[name]
    fields, config_fields = module_fields(module), set(section(base_config(), path))
    not_its = set(table.not_its)
    assert len(not_its) == len(table.not_its), "a name listed twice in not_its"
    # A section field is a module field (read straight, or a derived one of the same name
    # such as dtype) or named as not the module's, never both, and no name is stale.
    assert config_fields - fields == not_its, f"config.{path} vs {module.__name__} + not_its"
    assert not (not_its & fields), "not_its names a field the module has"
    assert not (not_its & set(table.derived))


@pytest.mark.parametrize("name", NETWORKS)
def test_every_module_field_is_read_derived_or_a_listed_default(name):
    table, module, path = NETWORKS[name]
    fields, config_fields = module_fields(module), set(section(base_config(), path))
    derived, defaults = set(table.derived), set(MODULE_DEFAULTS.get(name, ()))
    assert derived <= fields, "a derived entry that is no field of the module"
    assert not (derived & defaults)
    assert not (defaults & config_fields), "a default field the config sets would be dropped"
    read = fields - derived - defaults
    assert read <= config_fields, f"{module.__name__} fields missing from config.{path}"
    assert set(table.taken) == read and len(table.taken) == len(read)


def test_derived_tables_are_small_and_as_documented():
    shared = {"out_channels", "num_classes", "use_dot_product_attention", "dtype"}
    assert set(factory.UNET.derived) == shared
    assert set(factory.DIT.derived) == shared | {"null_class", "dropout", "remat"}
    assert set(factory.TEXT_ENCODER.derived) == set()
    assert set(ae_lib.AUTOENCODER.derived) == {"image_channels", "dtype"}
    assert set(factory.UNET.not_its) == {
        "arch",
        "learn_sigma",
        "class_conditional",
        "attention",
        "context_length",
        "dit",
    }


def test_other_name_lists_of_the_same_fields_agree():
    assert ae_lib.ARCHITECTURE_FIELDS == ae_lib.AUTOENCODER.taken
    assert set(prompts.ARCHITECTURE_FIELDS) == set(factory.TEXT_ENCODER.taken)
    clip = {
        "vocab_size": 8,
        "hidden_size": 4,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 8,
    }
    assert set(convert_text.text_encoder_fields(clip)) == set(factory.TEXT_ENCODER.taken)


def test_name_lists_of_config_match_the_tables():
    assert set(config_lib.ARCHS) == set(factory.ARCHS)
    assert len(config_lib.ARCHS) == len(factory.ARCHS)
    assert set(config_lib.OBJECTIVES) == set(objectives.OBJECTIVES)
    assert len(config_lib.OBJECTIVES) == len(objectives.OBJECTIVES)


@pytest.mark.parametrize(
    "path, key, build",
    [
        ("model", "num_head", factory.create_model),
        ("model.dit", "hidden", factory.create_dit),
        ("text_encoder", "dtype", factory.create_text_encoder),
        ("autoencoder", "ch_multt", ae_lib.create_autoencoder),
    ],
)
def test_a_section_field_no_module_takes_is_an_error(path, key, build):
    config = base_config()
    section(config, path)[key] = 1
    with pytest.raises(ConfigError, match=rf"^config\.{path}\.{key}: "):
        build(config)


# --- the modules against a second formula ----------------------------------------------------


def load_config(name, arg=""):
    spec = importlib.util.spec_from_file_location(name[:-3], CONFIGS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def expected_out_channels(config):
    m, a = config.model, config.autoencoder
    latent = config.training.objective == "diffusion" and bool(a.weights or config.pretrained)
    channels = a.latent_channels if latent else config.data.channels
    return channels * 2 if m.learn_sigma else channels


def expected_unet(config):
    m = config.model
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        out_channels=expected_out_channels(config),
        num_classes=config.data.num_classes if m.class_conditional else 0,
        num_heads=m.num_heads,
        head_channels=m.head_channels,
        scale_shift_norm=m.scale_shift_norm,
        resblock_updown=m.resblock_updown,
        downsample_padding=m.downsample_padding,
        flip_sin_to_cos=m.flip_sin_to_cos,
        freq_shift=m.freq_shift,
        norm_groups=m.norm_groups,
        norm_eps=m.norm_eps,
        use_dot_product_attention=m.attention == "dot_product_attention",
        mid_attn_norm=m.mid_attn_norm,
        remat=m.remat,
        context_dim=m.context_dim,
        context_source=m.context_source,
        transformer_depth=m.transformer_depth,
        linear_projection=m.linear_projection,
        dtype=jnp.dtype(m.dtype),
    )


def expected_dit(config):
    m, dt = config.model, config.model.dit
    return DiT(
        patch_size=dt.patch_size,
        hidden_size=dt.hidden_size,
        depth=dt.depth,
        num_heads=dt.num_heads,
        mlp_ratio=dt.mlp_ratio,
        out_channels=expected_out_channels(config),
        num_classes=config.data.num_classes if m.class_conditional else 0,
        null_class=config.training.cond_drop_prob > 0,
        per_block_embedders=dt.per_block_embedders,
        freq_shift=dt.freq_shift,
        mlp_norm_eps=dt.mlp_norm_eps,
        dropout=m.dropout,
        use_dot_product_attention=m.attention == "dot_product_attention",
        remat=m.remat,
        dtype=jnp.dtype(m.dtype),
    )


def expected_text_encoder(config):
    te = config.text_encoder
    return CLIPTextEncoder(
        vocab_size=te.vocab_size,
        width=te.width,
        num_layers=te.num_layers,
        num_heads=te.num_heads,
        mlp_dim=te.mlp_dim,
        max_length=te.max_length,
        activation=te.activation,
        eps=te.eps,
    )


def expected_autoencoder(config):
    a = config.autoencoder
    return AutoencoderKL(
        ch=a.ch,
        ch_mult=tuple(a.ch_mult),
        num_res_blocks=a.num_res_blocks,
        latent_channels=a.latent_channels,
        image_channels=config.data.channels,
        norm_groups=a.norm_groups,
        norm_eps=a.norm_eps,
        mid_attention=a.mid_attention,
        dtype=jnp.dtype(config.model.dtype),
    )


def text_trained_config():
    """A text-conditioned latent U-Net trained with a small text encoder, lists as JSON
    would give them."""
    config = load_config("digits_latent.py", "smoke")
    m, te = config.model, config.text_encoder
    m.context_source, m.class_conditional, m.ch_mult = "text", False, [1, 2]
    m.learn_sigma, m.attention, m.dtype = True, "einsum", "bfloat16"
    te.width, te.num_layers, te.num_heads, te.mlp_dim, te.max_length = 8, 1, 2, 16, 7
    config.training.train_text_encoder = True
    return config


CASES = {
    "digits": lambda: load_config("digits.py"),
    "digits_uncond": lambda: load_config("digits.py", "uncond"),
    "digits_dit": lambda: load_config("digits_dit.py"),
    "digits_dit_uncond": lambda: load_config("digits_dit.py", "uncond"),
    "digits_latent": lambda: load_config("digits_latent.py"),
    "cifar10_improved": lambda: load_config("cifar10_improved.py"),
    "imagenet256_dit": lambda: load_config("imagenet256_dit.py"),
    "text_trained": text_trained_config,
}


@pytest.mark.parametrize("case", CASES)
def test_create_model_equals_the_field_by_field_modules(case):
    config = CASES[case]()
    expected = expected_dit(config) if config.model.arch == "dit" else expected_unet(config)
    if config.training.train_text_encoder:
        expected = TextTrainedDenoiser(unet=expected, text_encoder=expected_text_encoder(config))
    model = factory.create_model(config)
    assert model == expected
    assert hash(model) == hash(expected)
    assert factory.create_text_encoder(config) == expected_text_encoder(config)
    assert ae_lib.create_autoencoder(config) == expected_autoencoder(config)


def test_the_cases_cover_what_the_derived_fields_depend_on():
    configs = [make() for make in CASES.values()]
    assert {c.model.arch for c in configs} == {"unet", "dit"}
    assert {c.model.learn_sigma for c in configs} == {False, True}
    assert {c.model.class_conditional for c in configs} == {False, True}
    assert {c.model.attention for c in configs} == {"dot_product_attention", "einsum"}
    assert {c.model.dtype for c in configs} == {"float32", "bfloat16"}
    assert {config_lib.is_latent(c) for c in configs} == {False, True}
    dits = [c for c in configs if c.model.arch == "dit"]
    assert {c.training.cond_drop_prob > 0 for c in dits} == {False, True}
