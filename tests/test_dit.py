"""The DiT: parameter counts against the original's and diffusers', outputs against diffusers'
DiTTransformer2DModel on seeded tiny models (tests/fixtures/make_diffusers_dit.py), the
original repository's .pt, the export -> import round trip, and a digits DiT trained through
the command line."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_cli import run_cli

from diffusion_jax import config as config_lib
from diffusion_jax import errors, validation
from diffusion_jax.config import base_config
from diffusion_jax.models import create_model, factory, layers
from diffusion_jax.models.convert import WEIGHTS_FILE, dit
from diffusion_jax.models.dit import sincos_position_embedding
from diffusion_jax.recipes import dit_model
from diffusion_jax.run import run_keys, schedule_from_config, setup_run
from diffusion_jax.weights import job_params

FIXTURES = Path(__file__).parent / "fixtures"
SIZES = ("S/2", "B/2", "L/2", "XL/2")  # the order of the fixture's param_counts


@pytest.fixture(scope="module")
def peer():
    with np.load(FIXTURES / "diffusers_dit.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def imported():
    """(params, config) of each fixture, imported once."""
    return {
        "shared": dit.from_diffusers(FIXTURES / "diffusers_dit"),
        "per_block": dit.from_diffusers(FIXTURES / "diffusers_dit_per_block"),
        "original": dit.from_original(FIXTURES / "original_dit.pt", num_heads=2),
    }


def apply(params, config, peer):
    model = create_model(config)
    fn = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    return np.asarray(fn(params, peer["x"], peer["t"], peer["labels"]))


def imagenet_dit(size: str, per_block=False):
    """DiT-<size> on 256 px ImageNet latents (32x32x4), 1000 classes, learned sigma."""
    c = dit_model(base_config(), size)
    c.data.image_size, c.data.channels, c.data.num_classes = 32, 4, 1000
    c.model.learn_sigma = c.model.class_conditional = True
    c.model.dit.per_block_embedders = per_block
    return c


def count(config) -> int:
    shapes = factory.abstract_params(create_model(config), *factory.init_inputs(config))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def original_count(depth, width, patch, *, channels=4, size=32, classes=1000):
    """The original DiT's sum(p.numel() for p in model.parameters()), by hand from its
    modules (facebookresearch/DiT models.py), its frozen pos_embed (N, D) included."""
    d, out, tokens = width, 2 * channels, (size // patch) ** 2
    patch_embed = channels * patch * patch * d + d
    t_embedder = 256 * d + d + d * d + d
    y_embedder = (classes + 1) * d
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    block += d * 6 * d + 6 * d  # adaLN modulation
    final = (d * 2 * d + 2 * d) + (d * patch * patch * out + patch * patch * out)
    return patch_embed + tokens * d + t_embedder + y_embedder + depth * block + final


def test_parameter_counts_equal_the_original_and_diffusers(peer):
    for size, diffusers_count in zip(SIZES, peer["param_counts"], strict=True):
        config = imagenet_dit(size)
        dt = config.model.dit
        tokens = (32 // dt.patch_size) ** 2
        # The original counts its frozen position table; here it is a constant.
        expected = original_count(dt.depth, dt.hidden_size, dt.patch_size)
        assert count(config) + tokens * dt.hidden_size == expected, size
        assert count(imagenet_dit(size, per_block=True)) == diffusers_count, size
    assert original_count(28, 1152, 2) == 675_129_632  # the paper's 675M (DiT-XL/2)
    assert peer["param_counts"][-1] == 749_826_464


def test_position_table_is_the_one_in_the_original_checkpoint():
    from diffusion_jax.models.convert import torch_pickle

    pos = torch_pickle.load_state_dict(FIXTURES / "original_dit.pt")["pos_embed"]
    np.testing.assert_allclose(sincos_position_embedding(32, 4), pos[0], atol=1e-7)
    # Patches row-major; per patch (i, j): sin, cos of the column j, then of the row i, at
    # the frequencies 1 and 1/100 (width 8: two per quarter).
    table = sincos_position_embedding(8, 3)
    w = np.array([1.0, 0.01])
    for n, (i, j) in enumerate((i, j) for i in range(3) for j in range(3)):
        expected = np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)])
        np.testing.assert_allclose(table[n], expected, atol=1e-7)


def test_equals_diffusers_and_folds_equal_embedders(imported, peer):
    params, config = imported["shared"]
    assert not config.model.dit.per_block_embedders  # equal per-block embedders folded
    assert "emb" in params and "norm1.emb" not in params["transformer_blocks_1"]
    np.testing.assert_allclose(apply(params, config, peer), peer["shared"], atol=1e-4)

    params, config = imported["per_block"]
    assert config.model.dit.per_block_embedders and "emb" not in params
    np.testing.assert_allclose(apply(params, config, peer), peer["per_block"], atol=1e-4)


def test_pipeline_folder_describes_a_latent_run(imported):
    _, config = imported["shared"]
    assert config_lib.is_latent(config)
    assert config.autoencoder.weights == str(FIXTURES / "diffusers_dit" / "vae")
    assert (config.data.image_size, config.data.channels) == (16, 3)
    assert config_lib.model_input_shape(config) == (8, 4)
    assert (config.diffusion.schedule, config.diffusion.variance) == ("linear", "learned_range")
    assert config.data.num_classes == 10 and config.training.cond_drop_prob > 0
    validation.validate(config, num_devices=1)


def test_original_pt_imports_the_same_weights(imported, peer):
    params, config = imported["original"]
    jax.tree.map(np.testing.assert_array_equal, params, imported["shared"][0])
    # Evaluated with the original's conventions (freq shift 0, MLP eps 1e-6).
    assert (config.model.dit.freq_shift, config.model.dit.mlp_norm_eps) == (0.0, 1e-6)
    np.testing.assert_allclose(apply(params, config, peer), peer["shared_original"], atol=1e-4)
    # A train.py checkpoint ({"model", "ema", "opt", "args"}): its EMA.
    trained, _ = dit.from_original(FIXTURES / "original_dit_train.pt", num_heads=2)
    jax.tree.map(np.testing.assert_array_equal, trained, params)


@pytest.mark.parametrize("layout", ["shared", "per_block"])
def test_export_import_round_trip_is_exact(tmp_path, imported, layout):
    params, config = imported[layout]
    vae = None
    if layout == "shared":
        from diffusion_jax.models.convert import autoencoder_from_diffusers

        vae, _ = autoencoder_from_diffusers(FIXTURES / "diffusers_dit" / "vae")
    dit.to_diffusers(params, config, tmp_path, vae_params=vae)
    tensors = load_file(str(tmp_path / "transformer" / WEIGHTS_FILE))
    peer_folder = FIXTURES / ("diffusers_dit/transformer" if vae else "diffusers_dit_per_block")
    assert sorted(tensors) == sorted(load_file(str(peer_folder / WEIGHTS_FILE)))
    written = json.loads((tmp_path / "transformer" / "config.json").read_text())
    peer_cfg = json.loads((peer_folder / "config.json").read_text())
    assert written.items() >= {k: v for k, v in peer_cfg.items() if not k.startswith("_")}.items()
    loaded, loaded_config = dit.from_diffusers(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
    assert loaded_config.model.to_dict() == config.model.to_dict()
    ends = ("beta_start", "beta_end")  # written as their values, read back as such
    assert {k: v for k, v in loaded_config.diffusion.items() if k not in ends} == {
        k: v for k, v in config.diffusion.items() if k not in ends
    }
    np.testing.assert_allclose(
        schedule_from_config(loaded_config).betas, schedule_from_config(config).betas, rtol=1e-7
    )
    assert config_lib.is_latent(loaded_config) == (vae is not None)


def test_convert_tool_writes_a_params_file(tmp_path, imported):
    from diffusion_jax import export
    from diffusion_jax.tools import convert

    assert convert.main([str(FIXTURES / "diffusers_dit"), str(tmp_path / "dit.msgpack")]) == 0
    params, config = export.load_params(tmp_path / "dit.msgpack")
    jax.tree.map(np.testing.assert_array_equal, params, imported["shared"][0])
    assert config.model.arch == "dit" and config.autoencoder.weights.endswith("vae")


def test_model_options_and_the_null_label(imported, peer):
    params, config = imported["shared"]
    ref = apply(params, config, peer)
    for field, value in (("remat", True), ("attention", "einsum")):
        config_b = copy_config(config)
        config_b.model[field] = value
        np.testing.assert_allclose(apply(params, config_b, peer), ref, atol=1e-5)
    config_b = copy_config(config)
    config_b.model.dtype = "bfloat16"
    out16 = apply(params, config_b, peer)
    assert out16.dtype == np.float32 and 0 < np.abs(out16 - ref).max() < 0.05 * np.abs(ref).max()
    model = create_model(config)
    uncond = jax.jit(model.apply)({"params": params}, peer["x"], peer["t"], None)
    np.testing.assert_allclose(uncond[1], ref[1], atol=1e-6)  # labels[1] is the null label 10
    config_b = copy_config(config)
    config_b.training.cond_drop_prob = 0.0  # no null row: labels are required
    with pytest.raises(ValueError, match="no null class"):
        create_model(config_b).init(jax.random.key(0), peer["x"], peer["t"], None)


def copy_config(config):
    return type(config)(config.to_dict())


def test_fresh_init_is_adaln_zero_and_kernels_carry_logical_axes():
    config = imagenet_dit("S/2")
    config.model.dit.update(hidden_size=32, depth=2, num_heads=2)
    config.data.image_size = 8
    model = create_model(config)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *factory.init_inputs(config))
    specs = nn.get_partition_spec(boxed)["params"]
    block = specs["transformer_blocks_0"]
    assert tuple(block["attn1"]["to_q"]["kernel"]) == layers.QKV_AXES == ("embed", "heads")
    assert tuple(block["attn1"]["to_out_0"]["kernel"]) == ("heads", "embed")
    assert tuple(block["ff"]["net_0.proj"]["kernel"]) == ("embed", "mlp")
    assert tuple(block["ff"]["net_2"]["kernel"]) == ("mlp", "embed")
    assert tuple(block["norm1.linear"]["kernel"]) == layers.DENSE_AXES
    assert tuple(specs["pos_embed.proj"]["kernel"]) == layers.CONV_AXES
    params = jax.jit(model.init)(jax.random.key(0), *factory.init_inputs(config, batch=2))
    params = nn.unbox(params)["params"]
    for zero in (params["transformer_blocks_1"]["norm1.linear"], params["proj_out_2"]):
        assert not np.any(zero["kernel"]) and not np.any(zero["bias"])
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    out = jax.jit(model.apply)({"params": params}, x, jnp.array([1, 2]), jnp.array([0, 1]))
    assert out.shape == (2, 8, 8, 8) and not np.any(out)  # adaLN-Zero: the output starts at 0


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model.dit.patch_size", 3, "config.model.dit.patch_size: 3 does not divide"),
        ("model.dit.num_heads", 5, "config.model.dit.hidden_size"),
        ("model.context_dim", 8, "config.model.context_dim"),
        ("training.cond_drop_prob", 0.0, "config.training.cond_drop_prob"),
        ("model.arch", "vit", "config.model.arch"),
    ],
)
def test_dit_config_errors_name_the_field(field, value, match):
    config = load_digits_dit("cond,smoke")
    section, _, key = field.rpartition(".")
    node = config
    for part in section.split("."):
        node = node[part]
    node[key] = value
    with pytest.raises(errors.ConfigError, match=match) as err:
        validation.validate(config, num_devices=8)
    assert "\n" not in str(err.value)


def test_unet_only_checks_do_not_fire_for_a_dit():
    config = load_digits_dit("smoke")
    m = config.model
    m.norm_groups, m.ch_mult, m.attn_resolutions = 7, (1, 2, 2, 2, 2), (3,)
    validation.validate(config, num_devices=8)


def load_digits_dit(arg):
    from test_configs import load_config

    return load_config("digits_dit.py", arg)


def test_digits_dit_trains_through_the_command_line(tmp_path):
    """The smoke recipe, class-conditional with guidance: trains, checkpoints, samples the
    grid and scores digits_fd at the end, all through the U-Net's code paths."""
    result = run_cli("--config=configs/digits_dit.py:cond,smoke", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert np.load(tmp_path / "samples" / "step_2.npz")["arr_0"].shape == (8, 16, 16, 1)
    result = json.loads((tmp_path / "eval" / "step_2.json").read_text())
    assert np.isfinite(result["digits_fd"]) and result["guidance_scale"] == 2.0
    # Resuming or sampling without the null label's row it was trained with is one line
    # naming the setting, not a restore failure.
    config = load_digits_dit("cond,smoke")
    config.training.cond_drop_prob, config.sampling.guidance_scale = 0.0, -1.0
    with pytest.raises(errors.ConfigError, match=r"^config.training.cond_drop_prob: .* 11 rows"):
        job_params(config, tmp_path, setup_run(config, run_keys(config)[0]))
