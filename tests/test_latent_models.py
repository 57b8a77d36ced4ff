"""Latent diffusion's networks: the KL autoencoder, the cross-attention U-Net, CLIP's text
encoder and tokenizer; equal to diffusers/transformers on a seeded tiny Stable Diffusion
(tests/fixtures/make_tiny_stable_diffusion.py), exact round trips, named failures."""

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from safetensors.numpy import load_file, save_file

from diffusion_jax import diffusion as dm
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import (
    convert,
    create_autoencoder,
    create_text_encoder,
    create_unet,
    init_inputs,
    layers,
)
from diffusion_jax.models.clip_tokenizer import CLIPTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TINY_SD = FIXTURES / "tiny_sd"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "tiny_sd.npz"))


@pytest.fixture(scope="module")
def pipeline():
    return convert.from_pipeline(TINY_SD)


def test_tokenizer_equals_transformers_clip_tokenizer(reference):
    tokenizer = CLIPTokenizer.from_folder(TINY_SD / "tokenizer")
    np.testing.assert_array_equal(tokenizer(list(reference["prompts"])), reference["tokens"])
    # Start and end tokens around every prompt, the end kept when a prompt is cut.
    long = tokenizer(["horse " * 200])[0]
    assert long[0] == tokenizer.bos_id and long[-1] == tokenizer.eos_id and len(long) == 77


def test_text_encoder_equals_transformers(pipeline, reference):
    params, config = pipeline
    hidden = create_text_encoder(config).apply(
        {"params": params["text_encoder"]}, jnp.asarray(reference["tokens"])
    )
    np.testing.assert_allclose(hidden, reference["text_hidden"], atol=1e-4)


def test_autoencoder_equals_diffusers(pipeline, reference):
    params, config = pipeline
    model = create_autoencoder(config)
    variables = {"params": params["autoencoder"]}
    mean, logvar = model.apply(variables, jnp.asarray(reference["images"]), method=model.encode)
    np.testing.assert_allclose(mean, reference["posterior_mean"], atol=1e-4)
    np.testing.assert_allclose(logvar, reference["posterior_logvar"], atol=1e-4)
    decoded = model.apply(variables, jnp.asarray(reference["latents"]), method=model.decode)
    np.testing.assert_allclose(decoded, reference["decoded"], atol=1e-4)
    assert config.autoencoder.scaling_factor == 0.5


def test_condition_unet_equals_diffusers(pipeline, reference):
    params, config = pipeline
    assert config.model.context_dim == 16 and config.model.num_heads == 2
    out = create_unet(config).apply(
        {"params": params["unet"]},
        jnp.asarray(reference["latents"]),
        jnp.asarray(reference["timesteps"]),
        context=jnp.asarray(reference["context"]),
    )
    np.testing.assert_allclose(out, reference["unet_out"], atol=1e-4)


def test_pipeline_config_reads_the_scheduler_and_the_image_size(pipeline):
    _, config = pipeline
    f = config.diffusion
    assert (f.schedule, f.beta_start, f.beta_end, f.prediction) == (
        "scaled_linear",
        0.00085,
        0.012,
        "eps",
    )
    # 8x8 latents of a VAE with one downsampling: 16x16 RGB images.
    assert (config.data.image_size, config.data.channels) == (16, 3)


def cross_attention_config(**overrides):
    config = tiny_config(context_dim=6, context_source="text", num_heads=2, **overrides)
    return config


def random_params(model, inputs, seed=0):
    """Initialised parameters with every leaf perturbed (zero-initialised outputs included)."""
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), *inputs))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def test_condition_unet_round_trip_is_exact(tmp_path):
    config = cross_attention_config(head_channels=4, linear_projection=True, transformer_depth=2)
    model = create_unet(config)
    params = random_params(model, init_inputs(config))
    convert.to_diffusers(params, config, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == (
        "UNet2DConditionModel"
    )
    loaded, loaded_config = convert.from_diffusers(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
    for key in ("context_dim", "head_channels", "linear_projection", "transformer_depth"):
        assert loaded_config.model[key] == config.model[key], key


def test_autoencoder_and_text_encoder_round_trips_are_exact(tmp_path, pipeline):
    params, config = pipeline
    fields = {k: config.autoencoder[k] for k in (*ae_lib.ARCHITECTURE_FIELDS, "scaling_factor")}
    fields["image_channels"] = 3
    convert.autoencoder_to_diffusers(params["autoencoder"], fields, tmp_path / "vae")
    vae, _ = convert.autoencoder_from_diffusers(tmp_path / "vae")
    jax.tree.map(np.testing.assert_array_equal, params["autoencoder"], vae)
    te_fields = config.text_encoder.to_dict()
    convert.text_encoder_to_transformers(params["text_encoder"], te_fields, tmp_path / "te")
    # Written as the published files are: "text_model."-prefixed names.
    assert all(k.startswith("text_model.") for k in load_file(tmp_path / "te/model.safetensors"))
    text, _ = convert.text_encoder_from_transformers(tmp_path / "te")
    jax.tree.map(np.testing.assert_array_equal, params["text_encoder"], text)


@pytest.mark.parametrize(
    ("component", "weights"),
    [
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ],
)
def test_a_bad_weights_file_names_the_first_unmatched_tensor(tmp_path, component, weights):
    folder = tmp_path / component
    shutil.copytree(TINY_SD / component, folder)
    tensors = load_file(folder / weights)
    victim = sorted(tensors)[3]
    save_file({k: v for k, v in tensors.items() if k != victim}, folder / weights)
    load = {
        "unet": convert.from_diffusers,
        "vae": convert.autoencoder_from_diffusers,
        "text_encoder": convert.text_encoder_from_transformers,
    }[component]
    with pytest.raises(ValueError, match=rf"tensor '{victim}' .* is missing"):
        load(folder)
    save_file({**tensors, "stray.weight": np.zeros(3, np.float32)}, folder / weights)
    with pytest.raises(ValueError, match="tensor 'stray.weight' matches no parameter"):
        load(folder)


def test_cross_attention_to_a_zero_context_is_its_output_bias():
    """Keys and values have no bias: a zero context gives zero values, whatever the
    attention weights, so attn2 returns exactly to_out's bias."""
    block = layers.CrossAttention(num_heads=2)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    zeros = jnp.zeros((2, 3, 6))
    params = random_params(block, (x, zeros))
    out = block.apply({"params": params}, x, zeros)
    np.testing.assert_allclose(out, jnp.broadcast_to(params["to_out_0"]["bias"], out.shape))


def test_zero_context_and_guidance_zero_reduce_to_the_unconditional_model():
    config = cross_attention_config()
    model = create_unet(config)
    params = random_params(model, init_inputs(config))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3, 700])
    context = jax.random.normal(jax.random.key(2), (2, 4, 6))

    def model_fn(x, t, y):
        return model.apply({"params": params}, x, t, context=y)

    np.testing.assert_array_equal(model_fn(x, t, jnp.zeros((2, 7, 6))), model_fn(x, t, None))
    assert float(jnp.abs(model_fn(x, t, context) - model_fn(x, t, None)).max()) > 1e-3
    sched = dm.make_schedule("linear", 100)
    common = dict(x_T=x, sampler="ddim", num_steps=5, clip_denoised=False)
    guided_zero = dm.sample(
        model_fn, sched, jax.random.key(3), labels=context, guidance_scale=0.0, **common
    )
    unconditional = dm.sample(model_fn, sched, jax.random.key(3), **common)
    np.testing.assert_allclose(guided_zero, unconditional, rtol=1e-5, atol=1e-5)
    guided_one = dm.sample(
        model_fn, sched, jax.random.key(3), labels=context, guidance_scale=1.0, **common
    )
    conditional = dm.sample(model_fn, sched, jax.random.key(3), labels=context, **common)
    np.testing.assert_allclose(guided_one, conditional, rtol=1e-5, atol=1e-5)


def test_class_context_model_guidance_zero_is_the_null_label():
    config = tiny_config(context_dim=6, context_source="class", class_conditional=True)
    model = create_unet(config)
    params = random_params(model, init_inputs(config))
    assert "class_context" in params and "class_embedding" not in params
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([3, 700])
    null = model.apply({"params": params}, x, t, jnp.array([10, 10]))
    np.testing.assert_array_equal(model.apply({"params": params}, x, t, None), null)


def test_kl_and_autoencoder_loss_equal_numpy_float64():
    rng = np.random.default_rng(0)
    mean, logvar = rng.normal(size=(2, 2, 2, 3)), rng.normal(size=(2, 2, 2, 3))
    x, x_hat = rng.normal(size=(2, 4, 4, 1)), rng.normal(size=(2, 4, 4, 1))
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2 per dimension.
    s = np.exp(0.5 * logvar)
    kl = (np.log(1 / s) + (s**2 + mean**2) / 2 - 0.5).reshape(2, -1).sum(1)
    np.testing.assert_allclose(ae_lib.kl_to_standard_normal(mean, logvar), kl, rtol=1e-5)
    loss, terms = ae_lib.autoencoder_loss(x, x_hat, mean, logvar, kl_weight=0.1)
    l1 = np.abs(x - x_hat).reshape(2, -1).mean(1)
    np.testing.assert_allclose(loss, l1 + 0.1 * kl / 16, rtol=1e-5)
    np.testing.assert_allclose(terms["mse"], ((x - x_hat) ** 2).reshape(2, -1).mean(1), rtol=1e-5)


def test_autoencoder_shapes_and_posterior_sample():
    config = tiny_config()
    a = config.autoencoder
    a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels, a.norm_groups = 4, (1, 2), 1, 2, 2
    config.data.image_size, config.data.channels = 8, 1
    model = create_autoencoder(config)
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    params = random_params(model, (x, noise))
    x_hat, mean, logvar = model.apply({"params": params}, x, noise)
    assert x_hat.shape == x.shape and mean.shape == logvar.shape == (3, 4, 4, 2)
    direct = model.apply(
        {"params": params}, mean + jnp.exp(0.5 * logvar) * noise, method=model.decode
    )
    np.testing.assert_allclose(x_hat, direct, atol=1e-6)


def test_blur_baseline_keeps_constant_blocks_and_loses_detail():
    flat = jnp.ones((1, 8, 8, 1)) * 0.3
    np.testing.assert_allclose(ae_lib.blur_baseline(flat, 2), flat, atol=1e-6)
    checker = jnp.asarray((np.indices((8, 8)).sum(0) % 2 * 2 - 1)[None, :, :, None], jnp.float32)
    np.testing.assert_allclose(ae_lib.blur_baseline(checker, 2), 0.0, atol=1e-6)


def test_text_to_image_equals_the_diffusers_pipeline(reference):
    """Prompt -> tokens -> CLIP -> guided DDIM over the same 5 timesteps from the same
    latents -> VAE decode: the whole of StableDiffusionPipeline."""
    from diffusion_jax import preflight
    from diffusion_jax.config import base_config
    from diffusion_jax.jobs import sample

    config = base_config()
    config.pretrained = str(TINY_SD)
    s = config.sampling
    s.prompt, s.negative_prompt, s.guidance_scale = str(reference["pipeline_prompt"]), "", 3.0
    s.sampler, s.eta, s.timesteps = (
        "ddim",
        0.0,
        tuple(int(t) for t in reference["pipeline_timesteps"]),
    )
    s.clip_denoised = False
    generate = sample.build_sampler(preflight.resolve(config, None, "sample"))
    x_T = jnp.asarray(reference["pipeline_latents"])
    x_T = jnp.concatenate([x_T] + [jnp.zeros_like(x_T)] * (generate.mesh.size - 1))
    images = generate(jax.random.key(0), generate.mesh.size, x_T)
    ours = (np.asarray(images[:1]) + 1.0) / 2.0
    theirs = reference["pipeline_image"]
    inside = (theirs > 0.01) & (theirs < 0.99)  # pixels the [0, 1] clamp leaves alone
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours, theirs, atol=2e-4)


def test_autoencoder_weights_problems_name_the_field(tmp_path):
    from diffusion_jax.config import base_config
    from diffusion_jax.errors import ConfigError
    from diffusion_jax.weights import load_autoencoder

    config = base_config()
    config.autoencoder.weights = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.autoencoder.weights: .* does not exist"):
        load_autoencoder(config)
    config.autoencoder.weights = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an autoencoder run"):
        load_autoencoder(config)
    (tmp_path / "config.json").write_text(base_config().to_json())
    with pytest.raises(ConfigError, match="trained 'diffusion', not an autoencoder"):
        load_autoencoder(config)
    # Stable Diffusion-like VAE of 8/16 channels against the default 128-channel config.
    config.autoencoder.weights = str(TINY_SD / "vae")
    with pytest.raises(ConfigError, match=r"config.autoencoder.ch: 128 differs from 8"):
        load_autoencoder(config)
