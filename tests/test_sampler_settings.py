"""Every sampler option is checked in one place (`dm.SamplerSettings.check`): the config's
validation and `dm.sample` give the same one-line error, naming the config field or the
option; the keyword form of `dm.sample` is its settings form."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax import validation
from diffusion_jax.errors import ConfigError

T = 40  # the schedule of both paths


def tiny_model(x, t, labels):
    """An eps-predictor with a label effect, cheap to compile."""
    scale = jnp.cos(t.astype(x.dtype) / 30.0)[:, None]
    shift = 0.0 if labels is None else 0.05 * labels.astype(x.dtype)[:, None]
    return 0.5 * jnp.tanh(x) * scale + 0.1 * x + shift


def config_error(fields: dict) -> str:
    config = config_lib.base_config()
    config.diffusion.num_timesteps = T
    config.sampling.num_steps = 10
    for field, value in fields.items():
        section, key = field.split(".")
        config[section][key] = value
    with pytest.raises(ConfigError) as info:
        validation.validate(config)
    return str(info.value)


def sample_error(options: dict) -> str:
    sched = dm.make_schedule("linear", T)
    options = {"sampler": "ddim", "num_steps": 10, **options}
    with pytest.raises(ValueError) as info:
        dm.sample(tiny_model, sched, jax.random.key(0), shape=(2, 3), **options)
    return str(info.value)


# (config fields, the same as dm.sample options, the config field named, the option named)
BAD = [
    ({"sampling.sampler": "lms"}, {"sampler": "lms"}, "sampling.sampler", "sampler"),
    ({"sampling.spacing": "cubic"}, {"spacing": "cubic"}, "sampling.spacing", "spacing"),
    # Karras sigmas (euler's default) and a spacing are one choice too many.
    (
        {"sampling.sampler": "euler", "sampling.spacing": "uniform"},
        {"sampler": "euler", "spacing": "uniform"},
        "sampling.spacing",
        "spacing",
    ),
    (
        {"sampling.use_karras_sigmas": True},
        {"karras_sigmas": True},
        "sampling.use_karras_sigmas",
        "karras_sigmas",
    ),
    (
        {
            "sampling.sampler": "dpm_solver++",
            "sampling.use_karras_sigmas": True,
            "sampling.timesteps": (30, 20, 10),
        },
        {"sampler": "dpm_solver++", "karras_sigmas": True, "timesteps": (30, 20, 10)},
        "sampling.timesteps",
        "timesteps",
    ),
    ({"sampling.solver_order": 2}, {"solver_order": 2}, "sampling.solver_order", "solver_order"),
    (
        {"sampling.sampler": "dpm_solver++_sde", "sampling.solver_order": 3},
        {"sampler": "dpm_solver++_sde", "solver_order": 3},
        "sampling.solver_order",
        "solver_order",
    ),
    (
        {"sampling.final_sigmas_type": "sigma_max"},
        {"final_sigmas_type": "sigma_max"},
        "sampling.final_sigmas_type",
        "final_sigmas_type",
    ),
    (
        {"sampling.sampler": "ddpm", "sampling.final_sigmas_type": "sigma_min"},
        {"sampler": "ddpm", "final_sigmas_type": "sigma_min"},
        "sampling.final_sigmas_type",
        "final_sigmas_type",
    ),
    (
        {"sampling.timesteps": (10, 30, 5)},
        {"timesteps": (10, 30, 5)},
        "sampling.timesteps",
        "timesteps",
    ),
    ({"sampling.timesteps": (T, 3)}, {"timesteps": (T, 3)}, "sampling.timesteps", "timesteps"),
    ({"sampling.num_steps": T + 1}, {"num_steps": T + 1}, "sampling.num_steps", "num_steps"),
    ({"sampling.num_steps": 0}, {"num_steps": 0}, "sampling.num_steps", "num_steps"),
    (
        {"sampling.sampler": "unipc", "sampling.unipc_variant": "bh3"},
        {"sampler": "unipc", "unipc_variant": "bh3"},
        "sampling.unipc_variant",
        "unipc_variant",
    ),
    ({"sampling.s_churn": -1.0}, {"s_churn": -1.0}, "sampling.s_churn", "s_churn"),
    ({"sampling.s_noise": -0.5}, {"s_noise": -0.5}, "sampling.s_noise", "s_noise"),
    ({"sampling.eta": -0.1}, {"eta": -0.1}, "sampling.eta", "eta"),
    ({"sampling.steps_offset": -1}, {"steps_offset": -1}, "sampling.steps_offset", "steps_offset"),
    (
        {"sampling.conventions": "pytorch"},
        {"conventions": "pytorch"},
        "sampling.conventions",
        "conventions",
    ),
    (
        {"diffusion.prediction": "noise"},
        {"prediction": "noise"},
        "diffusion.prediction",
        "prediction",
    ),
]


@pytest.mark.parametrize(
    "fields,options,field,option", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)]
)
def test_config_and_sample_give_the_same_error(fields, options, field, option):
    from_config = config_error(fields)
    from_sample = sample_error(options)
    assert "\n" not in from_config and "\n" not in from_sample
    assert from_config.startswith(f"config.{field}: ")
    assert from_sample.startswith(f"{option}: ")
    text = from_sample.removeprefix(f"{option}: ")
    assert from_config == f"config.{field}: {text}"
    # The settings alone say the same.
    settings = dm.SamplerSettings(**{"sampler": "ddim", "num_steps": 10, **options})
    with pytest.raises(ValueError, match="^" + option + ": "):
        settings.check(T)


def test_every_config_field_of_an_option_is_named():
    options = {f.name for f in dataclasses.fields(dm.SamplerSettings)}
    assert set(config_lib.SAMPLER_FIELDS) == options - {"s_tmin", "s_tmax"}


def test_explicit_timesteps_override_the_spacing_of_either_path():
    """The rule the two copies disagreed on: euler with a spacing and explicit timesteps.
    Explicit timesteps override num_steps and spacing (DESIGN.md), and replace euler's
    default Karras grid, so both paths accept it."""
    config = config_lib.base_config()
    config.diffusion.num_timesteps = T
    s = config.sampling
    s.sampler, s.spacing, s.timesteps, s.num_steps = "euler", "uniform", (30, 20, 10), 10
    validation.validate(config)
    settings = config_lib.sample_settings(config)
    assert not settings.uses_karras_sigmas and settings.nfe == 3
    sched = dm.make_schedule("linear", T)
    x = dm.sample(tiny_model, sched, jax.random.key(0), shape=(2, 3), settings=settings)
    assert np.all(np.isfinite(np.asarray(x)))


def test_sample_has_at_most_ten_parameters():
    assert len(inspect.signature(dm.sample).parameters) <= 10


def test_an_unknown_option_is_one_line_naming_it():
    sched = dm.make_schedule("linear", T)
    with pytest.raises(TypeError, match="^num_step: not a sampler option") as info:
        dm.sample(tiny_model, sched, jax.random.key(0), shape=(2, 3), num_step=5)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "options",
    [
        dict(sampler="ddim", num_steps=6, eta=0.5),
        dict(sampler="ddpm", num_steps=5, variance="fixed_small"),
        dict(sampler="heun", num_steps=5, s_churn=1.0, clip_denoised=False),
        dict(sampler="dpm_solver++", num_steps=6, solver_order=3, guidance_scale=2.0),
        dict(sampler="unipc", num_steps=4, spacing="linspace", conventions="diffusers"),
    ],
)
def test_keyword_form_equals_settings_form(options):
    sched = dm.make_schedule("linear", T)
    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.key(1), (4, 3))
    labels = jnp.arange(4, dtype=jnp.int32)
    by_keyword = dm.sample(tiny_model, sched, key, x_T=x_T, labels=labels, **options)
    settings = dm.SamplerSettings(**options)
    by_settings = dm.sample(tiny_model, sched, key, x_T=x_T, labels=labels, settings=settings)
    np.testing.assert_array_equal(np.asarray(by_keyword), np.asarray(by_settings))
    # Options replace the settings' fields.
    base = dm.SamplerSettings(sampler="ddpm", num_steps=T, eta=0.9)
    replaced = dm.sample(tiny_model, sched, key, x_T=x_T, labels=labels, settings=base, **options)
    np.testing.assert_array_equal(np.asarray(by_keyword), np.asarray(replaced))


def test_nfe_and_record():
    settings = dm.SamplerSettings(sampler="heun", num_steps=36)
    assert settings.nfe == dm.nfe("heun", 36) == 35
    assert settings.record() == {"sampler": "heun", "num_steps": 36, "nfe": 35}
    explicit = dm.SamplerSettings(sampler="heun", num_steps=50, timesteps=np.array([30, 20, 10]))
    assert explicit.timesteps == (30, 20, 10) and explicit.nfe == 5
    config = config_lib.base_config()
    config.sampling.timesteps = (900, 500, 100)
    assert config_lib.sample_settings(config).record() == {
        "sampler": "ddim",
        "num_steps": 50,
        "nfe": 3,
    }


def test_config_guidance_becomes_the_settings():
    config = config_lib.base_config()
    for value, expected in ((-1.0, None), (1.0, None), (0.0, 0.0), (3.5, 3.5)):
        config.sampling.guidance_scale = value
        assert config_lib.sample_settings(config).guidance_scale == expected
