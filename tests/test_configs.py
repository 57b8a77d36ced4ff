"""Every recipe loads, validates, and (its smoke variant) trains one step; the tfds recipes
under tfds.testing.mock_data, so the real input path runs without a download."""

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import errors, validation
from diffusion_jax.jobs import train as train_job

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = {
    "digits.py": ["", "cond", "smoke", "cond,smoke"],
    "cifar10.py": ["", "cond", "smoke", "cond,smoke"],
    "cifar10_improved.py": ["", "smoke"],
    "celebahq256.py": ["", "smoke"],
    "lsun256.py": ["church", "bedroom", "church,smoke", "bedroom,smoke"],
    "imagenet64.py": ["", "cond", "smoke"],
    "digits_latent.py": ["", "autoencoder", "smoke", "autoencoder,smoke"],
    "celebahq256_latent.py": ["", "autoencoder", "smoke", "autoencoder,smoke"],
    "sd15_sample.py": ["", "dpm", "euler"],
    "sd2_sample.py": ["", "dpm", "euler"],
    "sd15_finetune.py": ["", "smoke"],
    "digits_dit.py": ["", "cond", "smoke", "cond,smoke"],
    "imagenet256_dit.py": ["", "smoke"],
}


def load_config(name, arg=""):
    spec = importlib.util.spec_from_file_location(name[:-3], CONFIGS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_every_config_file_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.py")) == sorted(RECIPES)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in RECIPES.items() for a in args])
def test_config_loads_and_validates(name, arg):
    config = load_config(name, arg)
    validation.validate(config, num_devices=8 if "smoke" in arg else None)
    # Loading twice gives the same config: a recipe keeps no state between calls.
    assert load_config(name, arg).to_json_best_effort() == config.to_json_best_effort()
    text = (CONFIGS / name).read_text()
    assert "diffusion-jax --config=configs/" + name in text, "docstring holds the command"


def test_published_parameter_counts():
    from test_unet import count_params

    # Ho et al.: 35.7M for CIFAR-10 (exactly diffusers' 35,746,307), 114M for the 256 models
    # (diffusers' UNet2DModel with the same settings: 113,673,219).
    assert count_params(load_config("cifar10.py")) == 35_746_307
    assert count_params(load_config("celebahq256.py")) == 113_673_219
    assert count_params(load_config("lsun256.py", "church")) == 113_673_219


def test_unknown_config_arg_names_it():
    with pytest.raises(errors.ConfigError, match="unknown option"):
        load_config("lsun256.py", "kitchen")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("diffusion.schedule", "quadratic", "config.diffusion.schedule"),
        ("data.image_size", 15, "config.data.image_size"),
        ("sampling.sampler", "lms", "config.sampling.sampler"),
        ("model.learn_sigma", True, "config.model.learn_sigma"),
        ("training.batch_size", 12, "config.training.batch_size"),
    ],
)
def test_invalid_config_names_the_field(field, value, match):
    config = load_config("digits.py", "smoke")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(errors.ConfigError, match=match):
        validation.validate(config, num_devices=8)


def smoke_run(config, workdir):
    config.training.num_steps = 1
    config.training.sample_every = 1
    config.sampling.num_samples = 8
    return train_job.train_and_evaluate(config, workdir)


# The digits smoke trains through the command line in test_cli.py; cifar10_improved's also
# runs the cifar10 input path of tfds (under mock data).
@pytest.mark.parametrize("name,arg", [("cifar10_improved.py", "smoke")])
def test_smoke_variant_trains_one_step(tmp_path, name, arg):
    config = load_config(name, arg)
    if config.data.dataset != "digits":
        with tfds.testing.mock_data(num_examples=32):
            state = smoke_run(config, tmp_path)
    else:
        state = smoke_run(config, tmp_path)
    assert int(state.step) == 1
    assert (tmp_path / "samples" / "step_1.png").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.parametrize(
    "name,arg",
    [
        ("celebahq256.py", "smoke"),  # cifar10's input path runs in the test above
        ("lsun256.py", "bedroom,smoke"),
        ("imagenet64.py", "smoke"),
    ],
)
def test_tfds_recipes_run_one_step_on_mock_data(tmp_path, name, arg):
    config = load_config(name, arg)
    config.training.sample_every = 10  # the grid is covered above; keep this one quick
    config.training.num_steps = 1
    with tfds.testing.mock_data(num_examples=32):
        state = train_job.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 1
    assert np.isfinite(json.loads((tmp_path / "metrics.jsonl").read_text())["loss"])
    assert jax.tree.leaves(state.params)
