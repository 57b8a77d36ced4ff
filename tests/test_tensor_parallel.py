"""The 'tensor' mesh axis on 8 fake devices: the logical-axis rules, the mesh's sizes and
errors, sharded training equal to one device, attention kernels really split over 'tensor',
and a checkpoint written with tensor=2 restored with tensor=1."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from helpers import tiny_config
from jax.sharding import PartitionSpec as P
from test_training import batch_for

from diffusion_jax import checkpointing, parallel
from diffusion_jax.config import base_config
from diffusion_jax.errors import ConfigError
from diffusion_jax.models.factory import abstract_params, create_model, init_inputs
from diffusion_jax.run import run_keys, setup_run
from diffusion_jax.validation import mesh_shape, validate

MESHES = [(2, 2, 2), (1, 1, 8)]
NUM_STEPS = 3


def mesh_id(mesh):
    return "x".join(map(str, mesh))


def parity_config(arch, mesh=(1, 1, 1)):
    """A one-level U-Net with 4-head attention over 8x8 positions (16 channels), or a
    class-conditional 2-block DiT of width 32 in 4 heads (MLP 128) over 2x2 patches: the
    'tensor' split of 2 falls between heads, that of 8 inside them."""
    config = tiny_config(ch=16, ch_mult=(1,), attn_resolutions=(8,), num_heads=4, dropout=0.0)
    if arch == "dit":
        config.model.arch, config.model.class_conditional = "dit", True
        config.model.dit.update(patch_size=2, hidden_size=32, depth=2, num_heads=4)
    config.training.batch_size = 8
    config.optim.lr, config.optim.warmup_steps = 1e-3, 0
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    return config


@functools.cache
def initial_state(arch):
    """The fresh state of `arch` on one device, on the host: every mesh starts from it (one
    compiled init for all of them)."""
    config = parity_config(arch)
    init_key = run_keys(config)[0]
    run = setup_run(config, init_key, jax.devices()[:1])
    return jax.tree.map(np.asarray, run.init_state(init_key))


@functools.cache
def trained(arch, mesh):
    """(state, per-step metrics, the compiled step's HLO) after NUM_STEPS steps on `mesh`
    (one device for (1, 1, 1)), the same batches every time."""
    config = parity_config(arch, mesh)
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key, jax.devices()[: int(np.prod(mesh))])
    state = jax.device_put(initial_state(arch), run.state_sharding)
    batches = [
        jax.device_put(batch_for(config, seed), parallel.batch_sharding(run.mesh))
        for seed in range(NUM_STEPS)
    ]
    step = run.make_step().lower(state, batches[0], train_key).compile()
    metrics = []
    for batch in batches:
        state, m = step(state, batch, train_key)
        metrics.append(jax.device_get(m))
    return state, metrics, step.as_text()


@pytest.mark.parametrize("mesh", MESHES, ids=mesh_id)
@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_tensor_parallel_training_equals_one_device(arch, mesh):
    state, metrics, hlo = trained(arch, mesh)
    ref_state, ref_metrics, _ = trained(arch, (1, 1, 1))
    leaf = state.params["conv_in" if arch == "unet" else "pos_embed.proj"]["kernel"]
    assert dict(leaf.sharding.mesh.shape) == dict(
        zip(("data", "fsdp", "tensor"), mesh, strict=True)
    )
    if mesh[2] == 8:
        # Megatron-style: each device computes with its own slice of the heads and hidden
        # units (activations are summed over 'tensor'); no parameter is ever gathered.
        assert "all-reduce" in hlo and "all-gather" not in hlo
    losses = [float(m["loss"]) for m in metrics]
    np.testing.assert_allclose(losses, [float(m["loss"]) for m in ref_metrics], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    # The steps moved every kernel (those split over 'tensor' included) by far more than
    # the tolerance.
    paths = jax.tree_util.tree_flatten_with_path(state.params)[0]
    start = jax.tree.leaves(initial_state(arch).params)
    for (path, a), b in zip(paths, start, strict=True):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            assert np.abs(np.asarray(a) - b).max() > 1e-4, jax.tree_util.keystr(path)


def assert_split(tree, name, spec, shard_shape):
    array = tree[name]
    assert array.sharding.spec == spec, name
    assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, name


@pytest.mark.parametrize("mesh", MESHES, ids=mesh_id)
def test_unet_attention_kernels_are_split_over_tensor(mesh):
    state, _, _ = trained("unet", mesh)
    tensor = mesh[2]
    block = "mid_block.attentions_0"
    for tree in (state.params, state.ema_params, state.opt_state[1][0].mu):
        for name in ("to_q", "to_k", "to_v"):
            assert_split(tree[block][name], "kernel", P(None, "tensor"), (16, 16 // tensor))
            assert_split(tree[block][name], "bias", P("tensor"), (16 // tensor,))
        assert_split(tree[block]["to_out_0"], "kernel", P("tensor", None), (16 // tensor, 16))
    # Kernels without "heads" / "mlp" never go on 'tensor'.
    for kernel in (state.params["up_blocks_0.resnets_0"]["conv1"]["kernel"],):
        assert "tensor" not in jax.tree.leaves(tuple(kernel.sharding.spec))


@pytest.mark.parametrize("mesh", MESHES, ids=mesh_id)
def test_dit_heads_and_mlp_are_split_over_tensor(mesh):
    """Megatron's layout: q/k/v (and their biases) and the MLP's first layer split along
    their outputs, the attention output and the MLP's second layer along their inputs; the
    MLP kernels (4,096 elements) are also split over 'fsdp' along "embed"."""
    state, _, _ = trained("dit", mesh)
    _, fsdp, tensor = mesh
    f = "fsdp" if fsdp > 1 else None
    block = state.params["transformer_blocks_1"]
    for name in ("to_q", "to_k", "to_v"):
        assert_split(block["attn1"][name], "kernel", P(None, "tensor"), (32, 32 // tensor))
        assert_split(block["attn1"][name], "bias", P("tensor"), (32 // tensor,))
    assert_split(block["attn1"]["to_out_0"], "kernel", P("tensor", None), (32 // tensor, 32))
    ff = block["ff"]
    assert_split(ff["net_0.proj"], "kernel", P(f, "tensor"), (32 // fsdp, 128 // tensor))
    assert_split(ff["net_0.proj"], "bias", P("tensor"), (128 // tensor,))
    assert_split(ff["net_2"], "kernel", P("tensor", f), (128 // tensor, 32 // fsdp))
    modulation = block["norm1.linear"]["kernel"]  # (32, 192): "embed_in", "embed_out"
    assert "tensor" not in jax.tree.leaves(tuple(modulation.sharding.spec))


def test_spatial_transformer_carries_heads_and_mlp_names():
    """Latent diffusion's cross-attention blocks: q/k/v, the attention output and the GEGLU
    feed-forward split over 'tensor' like the DiT's (names only: the parameters are
    diffusers')."""
    config = tiny_config(context_dim=6, context_source="text", num_heads=2)
    model = create_model(config)
    boxed = abstract_params(model, *init_inputs(config), boxed=True)
    specs = jax.tree.map(tuple, nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, P))
    block = specs["down_blocks_1.attentions_0"]["transformer_blocks_0"]
    for attn in ("attn1", "attn2"):
        for name in ("to_q", "to_k", "to_v"):
            assert block[attn][name] == {"kernel": ("embed", "heads")}  # no bias
        assert block[attn]["to_out_0"] == {"kernel": ("heads", "embed"), "bias": ()}
    assert block["ff"]["net_0.proj"] == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}
    assert block["ff"]["net_2"] == {"kernel": ("mlp", "embed"), "bias": ()}


def test_checkpoint_written_with_tensor_2_restores_with_tensor_1(tmp_path):
    state, _, _ = trained("unet", (2, 2, 2))
    manager = checkpointing.make_manager(tmp_path)
    checkpointing.save(manager, NUM_STEPS, state, {"step": NUM_STEPS})
    manager.wait_until_finished()
    expected = jax.tree.map(np.asarray, state)

    config = parity_config("unet", (4, 2, 1))
    run = setup_run(config, run_keys(config)[0])
    step, restored, _ = checkpointing.restore_latest(
        checkpointing.make_manager(tmp_path, read_only=True), run.abstract_state
    )
    assert step == NUM_STEPS
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    kernel = restored.params["mid_block.attentions_0"]["to_q"]["kernel"]
    assert dict(kernel.sharding.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert kernel.sharding.is_fully_replicated  # 16 x 16: whole on 'fsdp', no 'tensor' left


@pytest.mark.parametrize(
    "shape,axes,fsdp,tensor,spec",
    [
        ((64, 128), ("embed", "heads"), 2, 2, P("fsdp", "tensor")),
        ((128, 64), ("heads", "embed"), 4, 8, P("tensor", "fsdp")),
        ((64, 256), ("embed", "mlp"), 1, 4, P(None, "tensor")),
        # 'tensor' does not divide 96 heads x channels: replicated on 'tensor' only.
        ((64, 96), ("embed", "heads"), 2, 64, P("fsdp", None)),
        # "embed" over 'fsdp' does not divide: the largest remaining dimension that does.
        ((63, 128, 64), ("embed", "mlp", None), 2, 2, P(None, "tensor", "fsdp")),
        # Small arrays: split over 'tensor' all the same, never over 'fsdp'.
        ((16, 32), ("embed", "heads"), 2, 2, P(None, "tensor")),
        (
            (3, 3, 64, 128),
            ("conv_height", "conv_width", "embed_in", "embed_out"),
            2,
            2,
            P(None, None, None, "fsdp"),
        ),
        ((64, 128), ("embed_in", "embed_out"), 2, 2, P(None, "fsdp")),
        ((128, 64), None, 2, 2, P("fsdp", None)),
        ((64, 128), ("embed", "heads"), 1, 1, P()),
    ],
)
def test_logical_axis_rules(shape, axes, fsdp, tensor, spec):
    assert parallel.param_spec(shape, axes, fsdp, tensor) == spec


@pytest.mark.parametrize(
    "sizes,expected",
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((2, 2, -1), (2, 2, 2)),
        ((1, -1, 2), (1, 4, 2)),
        ((-1, 2, 4), (1, 2, 4)),
    ],
)
def test_mesh_shape_fills_one_free_axis(sizes, expected):
    config = base_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
    assert mesh_shape(config, 8) == expected


@pytest.mark.parametrize(
    "sizes,message",
    [
        ((-1, 1, -1), "config.mesh: only one axis may be -1, not mesh.data and mesh.tensor"),
        (
            (-1, 1, 3),
            "config.mesh.data: -1 takes the devices the other axes leave, but their "
            "product 3 does not divide the 8 devices",
        ),
        ((2, 2, 4), "config.mesh: mesh.data x mesh.fsdp x mesh.tensor = 2 x 2 x 4 != 8"),
        ((8, 1, 0), "config.mesh.tensor: must be >= 1 or -1, not 0"),
    ],
)
def test_mesh_shape_errors_are_one_line(sizes, message):
    config = base_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        mesh_shape(config, 8)


def test_batch_is_split_over_data_and_fsdp_only():
    config = parity_config("unet", (1, 2, 4))
    config.training.batch_size = 2  # two batch shards, each on four 'tensor' devices
    validate(config, 8)
    mesh = parallel.make_mesh(config)
    batch = parallel.to_global({"image": np.arange(2 * 3, dtype=np.float32).reshape(2, 3)}, mesh)
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(1, 3)}
    config.training.batch_size = 3
    with pytest.raises(ConfigError, match=r"not divisible by the 2 batch shards .* = 1 x 2\)$"):
        validate(config, 8)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """Just what the mesh reads of a device of one of two processes."""

    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_tensor_axis_may_not_span_processes():
    """Each process feeds whole batch shards; a 'tensor' axis across two processes with four
    devices each could not be fed and is refused before anything is built."""
    devices = [FakeDevice(i, i // 4) for i in range(8)]
    config = base_config()
    config.mesh.data, config.mesh.tensor = 1, 8
    with pytest.raises(ConfigError, match="^config.mesh.tensor: 8 devices along 'tensor' span"):
        parallel.make_mesh(config, devices)
    config.mesh.data, config.mesh.tensor = 2, 4
    mesh = parallel.make_mesh(config, devices)
    owners = [[d.process_index for d in row.flat] for row in mesh.devices]
    assert owners == [[0] * 4, [1] * 4]  # one batch shard per process, 'tensor' inside it
