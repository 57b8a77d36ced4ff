"""The Flax U-Net: shapes, options, dtypes, the timestep embedding and parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from diffusion_jax.config import base_config
from diffusion_jax.models import create_model, layers


def init(config, x, key=0, perturb=True):
    """Initialised parameters; DDPM zero-initialises the last layers, so the tests perturb
    every parameter to make all paths matter."""
    model = create_model(config)
    t = jnp.zeros((x.shape[0],), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(key), x, t))["params"]
    if perturb:
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(key + 1), len(leaves))
        leaves = [
            p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)
        ]
        params = jax.tree.unflatten(tree, leaves)
    return model, params


def test_timestep_embedding_is_the_published_formula():
    t = np.array([0, 1, 17, 999])
    dim, half = 32, 16
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    got = layers.timestep_embedding(jnp.asarray(t), dim)
    np.testing.assert_allclose(got, expected, atol=2e-4)  # float32 sin of args up to 999
    flipped = layers.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=True, freq_shift=0)
    freqs0 = np.exp(-np.log(10000.0) * np.arange(half) / half)
    np.testing.assert_allclose(flipped[:, :half], np.cos(t[:, None] * freqs0), atol=2e-4)


OPTIONS = [
    {},
    {"scale_shift_norm": True, "resblock_updown": True, "downsample_padding": 1},
    {"num_heads": 2, "attn_resolutions": (8, 4)},
    {"head_channels": 4, "attention": "einsum"},
    {"learn_sigma": True},
    {"class_conditional": True},
    {"dtype": "bfloat16"},
    {"remat": True},
]


@pytest.mark.parametrize("overrides", OPTIONS, ids=lambda o: ",".join(o) or "ddpm")
def test_output_shape_and_dtype(overrides):
    config = tiny_config(**overrides)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    model, params = init(config, x)
    labels = jnp.array([1, 2]) if config.model.class_conditional else None
    out = model.apply({"params": params}, x, jnp.array([3, 500]), labels)
    channels = 2 if config.model.learn_sigma else 1
    assert out.shape == (2, 8, 8, channels) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_bfloat16_activations_track_float32():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 500])
    model32, params = init(tiny_config(), x)
    model16 = create_model(tiny_config(dtype="bfloat16"))
    out32 = model32.apply({"params": params}, x, t)
    out16 = model16.apply({"params": params}, x, t)
    assert out16.dtype == jnp.float32
    assert float(jnp.abs(out16 - out32).max()) < 0.05 * float(jnp.abs(out32).max())
    assert float(jnp.abs(out16 - out32).max()) > 0  # really ran in bfloat16


def test_dropout_only_in_training():
    config = tiny_config(dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    model, params = init(config, x)
    t = jnp.array([3, 500])
    a = model.apply({"params": params}, x, t)
    b = model.apply({"params": params}, x, t)
    np.testing.assert_array_equal(a, b)
    c = model.apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(1)})
    d = model.apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(c - a).max()) > 1e-3 and float(jnp.abs(c - d).max()) > 1e-3


def test_null_label_differs_from_real_labels():
    config = tiny_config(class_conditional=True)
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 8, 8, 1)), (3, 8, 8, 1))
    model, params = init(config, x)
    t = jnp.array([100, 100, 100])
    out = model.apply({"params": params}, x, t, jnp.array([0, 1, 10]))
    uncond = model.apply({"params": params}, x, t, None)
    np.testing.assert_allclose(uncond[0], out[2], atol=1e-6)  # None means the null label 10
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3
    assert float(jnp.abs(out[0] - out[2]).max()) > 1e-3
    assert params["class_embedding"]["embedding"].shape[0] == config.data.num_classes + 1


def test_remat_gives_same_output_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 500])
    model, params = init(tiny_config(dropout=0.1), x)
    remat_model = create_model(tiny_config(dropout=0.1, remat=True))

    def loss(model, params):
        out = model.apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(out**2)

    g = jax.grad(lambda p: loss(model, p))(params)
    g_remat = jax.grad(lambda p: loss(remat_model, p))(params)
    np.testing.assert_allclose(loss(model, params), loss(remat_model, params), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g_remat)


def test_kernels_carry_logical_axes():
    config = tiny_config()
    model = create_model(config)
    boxed = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    )
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["conv_in"]["kernel"]) == layers.CONV_AXES
    assert tuple(specs["time_embedding"]["linear_1"]["kernel"]) == layers.DENSE_AXES


def count_params(config):
    model = create_model(config)
    size = config.data.image_size
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, size, size, config.data.channels)),
        jnp.zeros((1,), jnp.int32),
    )
    return sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)["params"]))


def test_ddpm_cifar10_parameter_count():
    config = base_config()
    config.data.image_size, config.data.channels = 32, 3
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 128, (1, 2, 2, 2), 2, (16,)
    # 35,746,307: diffusers 0.42.1 UNet2DModel(block_out_channels=(128, 256, 256, 256),
    # layers_per_block=2, attention in the second down and third up block) counted with
    # sum(p.numel() for p in model.parameters()); Ho et al. report 35.7M.
    assert count_params(config) == 35_746_307
