"""Weights in the diffusers layout: round trips, error messages, and equality with diffusers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from safetensors.numpy import load_file, save_file
from test_unet import init

from diffusion_jax.models import create_model, from_diffusers, to_diffusers
from diffusion_jax.models.convert import WEIGHTS_FILE

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "scale_shift_norm": True,
            "resblock_updown": True,
            "class_conditional": True,
            "learn_sigma": True,
            "head_channels": 4,
            "flip_sin_to_cos": True,
            "freq_shift": 0.0,
        },
    ],
    ids=["ddpm", "improved"],
)
def test_round_trip_is_exact(tmp_path, overrides):
    config = tiny_config(**overrides)
    if config.model.learn_sigma:
        config.diffusion.variance = "learned_range"
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    _, params = init(config, x)
    to_diffusers(params, config, tmp_path)
    loaded, loaded_config = from_diffusers(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded)
    for key in (
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "scale_shift_norm",
        "resblock_updown",
        "learn_sigma",
        "class_conditional",
        "head_channels",
    ):
        assert tuple(np.atleast_1d(loaded_config.model[key])) == tuple(
            np.atleast_1d(config.model[key])
        ), key
    t = jnp.array([1, 900])
    labels = jnp.array([0, 3]) if config.model.class_conditional else None
    np.testing.assert_array_equal(
        create_model(config).apply({"params": params}, x, t, labels),
        create_model(loaded_config).apply({"params": loaded}, x, t, labels),
    )


def write_variant(tmp_path, mutate):
    config = tiny_config()
    _, params = init(config, jnp.zeros((1, 8, 8, 1)))
    to_diffusers(params, config, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    mutate(tensors)
    save_file(tensors, str(tmp_path / WEIGHTS_FILE))


def test_missing_tensor_is_named(tmp_path):
    write_variant(tmp_path, lambda t: t.pop("mid_block.resnets.1.conv2.weight"))
    with pytest.raises(ValueError, match=r"'mid_block.resnets.1.conv2.weight'.*missing"):
        from_diffusers(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    def mutate(t):
        t["conv_in.weight"] = np.zeros((8, 1, 5, 5), np.float32)

    write_variant(tmp_path, mutate)
    with pytest.raises(ValueError, match=r"'conv_in.weight' has shape \(5, 5, 1, 8\)"):
        from_diffusers(tmp_path)


def test_unknown_tensor_is_named(tmp_path):
    def mutate(t):
        t["extra_block.weight"] = np.zeros((2,), np.float32)

    write_variant(tmp_path, mutate)
    with pytest.raises(ValueError, match="'extra_block.weight' matches no parameter"):
        from_diffusers(tmp_path)


def test_legacy_attention_names_are_read(tmp_path):
    """The published DDPM files name attention weights query/key/value/proj_attn."""
    config = tiny_config()
    _, params = init(config, jnp.zeros((1, 8, 8, 1)))
    to_diffusers(params, config, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    renamed = {}
    for name, value in tensors.items():
        for new, old in (
            ("to_q", "query"),
            ("to_k", "key"),
            ("to_v", "value"),
            ("to_out.0", "proj_attn"),
        ):
            name = name.replace(f".{new}.", f".{old}.")
        renamed[name] = value
    save_file(renamed, str(tmp_path / WEIGHTS_FILE))
    loaded, _ = from_diffusers(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_unknown_block_type_is_named(tmp_path):
    config = tiny_config()
    _, params = init(config, jnp.zeros((1, 8, 8, 1)))
    to_diffusers(params, config, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["down_block_types"][0] = "CrossAttnDownBlock2D"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        from_diffusers(tmp_path)


@pytest.mark.parametrize("variant", ["ddpm", "improved"])
def test_outputs_match_diffusers(variant):
    """Fixtures written by tests/fixtures/make_diffusers_unet.py (versions in VERSIONS.txt)."""
    params, config = from_diffusers(FIXTURES / f"diffusers_unet_{variant}")
    data = np.load(FIXTURES / f"diffusers_unet_{variant}.npz")
    labels = jnp.asarray(data["labels"]) if config.model.class_conditional else None
    out = create_model(config).apply(
        {"params": params}, jnp.asarray(data["x"]), jnp.asarray(data["t"]), labels
    )
    np.testing.assert_allclose(out, data["out"], atol=1e-4)


def test_the_convert_program_writes_the_folder_as_one_file(tmp_path, capsys):
    from diffusion_jax import export
    from diffusion_jax.tools import convert as convert_tool

    assert convert_tool.main([]) == 2
    assert "usage: python -m diffusion_jax.tools.convert" in capsys.readouterr().out
    out = tmp_path / "ddpm.msgpack"
    assert convert_tool.main([str(FIXTURES / "diffusers_unet_ddpm"), str(out)]) == 0
    params, config = export.load_params(out)
    expected, expected_config = from_diffusers(FIXTURES / "diffusers_unet_ddpm")
    assert json.loads(config.to_json()) == json.loads(expected_config.to_json())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def _same_tree(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    pairs = zip(leaves_a, leaves_b, strict=True) if tree_a == tree_b else ()
    return tree_a == tree_b and all(np.array_equal(x, y) for x, y in pairs)


@pytest.mark.parametrize(
    "folder, reader",
    [
        ("diffusers_unet_ddpm", "unet"),  # UNet2DModel
        ("tiny_sd15/unet", "unet"),  # UNet2DConditionModel
        ("diffusers_dit", "dit"),  # DiTPipeline
        ("diffusers_dit/transformer", "dit"),  # DiTTransformer2DModel alone
        ("tiny_sd15", "pipeline"),  # a Stable Diffusion pipeline folder
    ],
)
def test_from_diffusers_dispatches_on_the_class_name(folder, reader):
    from diffusion_jax.models.convert import dit, pipeline, unet

    family = {"unet": unet.from_diffusers, "dit": dit.from_diffusers}
    family["pipeline"] = pipeline.from_pipeline
    params, config = from_diffusers(FIXTURES / folder)
    expected_params, expected_config = family[reader](FIXTURES / folder)
    assert _same_tree(params, expected_params)
    assert config.to_json_best_effort() == expected_config.to_json_best_effort()


def test_a_config_alone_dispatches_too():
    from diffusion_jax.models.convert import model_config_from_diffusers

    cfg = json.loads((FIXTURES / "diffusers_dit" / "transformer" / "config.json").read_text())
    assert model_config_from_diffusers(cfg).model.arch == "dit"
    cfg = json.loads((FIXTURES / "diffusers_unet_ddpm" / "config.json").read_text())
    assert model_config_from_diffusers(cfg).model.arch == "unet"


def test_a_class_no_importer_reads_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
    with pytest.raises(ValueError, match=r"_class_name 'UNet3DConditionModel' is not a model") as e:
        from_diffusers(tmp_path)
    assert "\n" not in str(e.value) and "UNet2DModel" in str(e.value)
    with pytest.raises(ValueError, match="an AutoencoderKL; read it with"):
        from_diffusers(FIXTURES / "tiny_sd15" / "vae")
