"""The train step: sharding equivalence on 8 fake devices, FSDP placement, gradient
accumulation, single compilation, EMA, warm-up and non-finite handling."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import override, tiny_config

from diffusion_jax import diffusion as dm
from diffusion_jax import errors, parallel
from diffusion_jax.jobs import train as train_job
from diffusion_jax.objectives import draw_step_inputs
from diffusion_jax.run import ema_gammas, run_keys, setup_run
from diffusion_jax.training import state as state_lib


def small_config(**overrides):
    config = tiny_config(ch=16)
    config.training.batch_size = 16
    config.model.dropout = 0.0
    config.optim.warmup_steps = 2
    config.optim.ema_sigma_rels = (0.05, 0.10)  # power-function EMAs ride along
    return override(config, **overrides)


def batch_for(config, seed=0):
    rng = np.random.default_rng(seed)
    d = config.data
    return {
        "image": rng.uniform(
            -1, 1, (config.training.batch_size, d.image_size, d.image_size, d.channels)
        ).astype(np.float32),
        "label": rng.integers(0, 10, config.training.batch_size).astype(np.int32),
    }


def train(config, devices, batches):
    """State and metrics after one step per batch on a mesh over `devices`."""
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key, devices)
    state, step = run.init_state(init_key), run.make_step()
    sharding = parallel.batch_sharding(run.mesh)
    metrics = []
    for b in batches:
        state, m = step(state, jax.device_put(b, sharding), train_key)
        metrics.append(jax.device_get(m))
    return state, metrics, run


@pytest.fixture(scope="module")
def single_device_result():
    config = small_config()
    return train(config, jax.devices()[:1], [batch_for(config, 0), batch_for(config, 1)])


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (2, 4)])
def test_sharded_step_equals_single_device(single_device_result, data, fsdp):
    assert jax.device_count() == 8
    config = small_config(**{"mesh.data": data, "mesh.fsdp": fsdp})
    state, metrics, run = train(config, jax.devices(), [batch_for(config, 0), batch_for(config, 1)])
    ref_state, ref_metrics, _ = single_device_result
    for m, r in zip(metrics, ref_metrics, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves((state.ema_params, state.power_emas)),
        jax.tree.leaves((ref_state.ema_params, ref_state.power_emas)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    if fsdp > 1:
        profile = state.power_emas[1]["up_blocks_0.resnets_0"]["conv1"]["kernel"]
        assert profile.sharding == state.params["up_blocks_0.resnets_0"]["conv1"]["kernel"].sharding
        kernel = state.params["up_blocks_0.resnets_0"]["conv1"]["kernel"]  # (3, 3, 64, 32)
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
        assert kernel.addressable_shards[0].data.shape == (3, 3, 64, 32 // fsdp)
        adam_mu = state.opt_state[1][0].mu["up_blocks_0.resnets_0"]["conv1"]["kernel"]
        assert adam_mu.sharding == kernel.sharding
        small = state.params["conv_in"]["bias"]
        assert small.sharding.is_fully_replicated


def test_gradient_accumulation_equals_one_large_step():
    config = small_config(**{"mesh.data": 8})
    batches = [batch_for(config, 0)]
    state, metrics, _ = train(config, jax.devices(), batches)
    accum = small_config(**{"mesh.data": 4, "training.grad_accum": 2})
    state_accum, metrics_accum, _ = train(accum, jax.devices()[:4], batches)
    np.testing.assert_allclose(metrics_accum[0]["loss"], metrics[0]["loss"], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(state_accum.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unroll", [False, True])
def test_accumulated_gradient_equals_whole_batch_gradient(unroll):
    """Both forms of the accumulation loop (the scan kept on accelerators, the unrolled one
    used on CPU) against the whole batch's gradient in one pass."""
    from diffusion_jax.training import step as step_lib

    config = small_config()
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key, jax.devices()[:1])
    params = run.init_state(init_key).params
    batch = jax.tree.map(jnp.asarray, batch_for(config, 0))
    inputs = draw_step_inputs(train_key, batch, run.sched, num_classes=10, cond_drop_prob=0.2)
    loss_fn = functools.partial(run.objective.loss, model=run.model, train=True)
    grads = jax.jit(
        lambda p, i, k, n, u: step_lib.compute_grads(loss_fn, p, i, k, grad_accum=n, unroll=u),
        static_argnums=(3, 4),
    )
    loss, _, whole = grads(params, inputs, train_key, 1, None)
    loss_accum, _, accum = grads(params, inputs, train_key, 4, unroll)
    np.testing.assert_allclose(loss_accum, loss, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(whole))
    for a, b in zip(jax.tree.leaves(accum), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=1e-4)


def test_step_compiles_once():
    config = small_config(**{"mesh.data": 8})
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key)
    from diffusion_jax.training import step as step_lib

    traced = chex.assert_max_traces(step_lib.train_step, n=1)
    step = jax.jit(
        lambda s, b, k: traced(
            s,
            b,
            k,
            model=run.model,
            objective=run.objective,
            optimizer=run.optimizer,
            lr_schedule=run.lr_schedule,
            grad_accum=config.training.grad_accum,
            ema_decay=config.optim.ema_decay,
            ema_warmup=config.optim.ema_warmup,
            ema_gammas=ema_gammas(config),
        ),
        donate_argnums=(0,),
    )
    state = run.init_state(init_key)
    for seed in range(3):
        state, _ = step(state, batch_for(config, seed), train_key)
    assert int(state.step) == 3
    chex.clear_trace_counter()


def test_nan_batch_is_skipped_and_counted():
    config = small_config(**{"mesh.data": 8})
    bad = batch_for(config, 0)
    bad["image"][0, 0, 0, 0] = np.nan
    state, metrics, _ = train(
        config, jax.devices(), [batch_for(config, 1), bad, batch_for(config, 2)]
    )
    assert [int(m["skipped"]) for m in metrics] == [0, 1, 0]
    assert int(state.skipped_steps) == 1 and int(state.consecutive_skips) == 0
    assert int(state.step) == 3
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params))
    # Adam's count only advanced on the two good steps.
    assert int(state.opt_state[1][0].count) == 2


def test_ema_update_matches_numpy():
    rng = np.random.default_rng(0)
    ema = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    got = state_lib.ema_update(ema, params, 0.9)
    for k in ema:
        np.testing.assert_allclose(got[k], 0.9 * ema[k] + 0.1 * params[k])
    for step in [0, 5, 1000]:
        expected = min(0.9999, (1 + step) / (10 + step))
        np.testing.assert_allclose(
            float(state_lib.ema_decay_at(step, 0.9999, True)), expected, rtol=1e-6
        )
    assert float(state_lib.ema_decay_at(3, 0.9999, False)) == np.float32(0.9999)


def test_ema_follows_params_through_steps():
    config = small_config(**{"mesh.data": 8, "optim.ema_decay": 0.5})
    init_key, _, _ = run_keys(config)
    run = setup_run(config, init_key)
    initial = jax.jit(run.init_fn)(init_key)
    state, _, _ = train(config, jax.devices(), [batch_for(config, 0)])
    leaf = lambda s: np.asarray(s["conv_in"]["kernel"])  # noqa: E731
    np.testing.assert_allclose(
        leaf(state.ema_params), 0.5 * leaf(initial.params) + 0.5 * leaf(state.params), rtol=1e-6
    )


def test_power_emas_follow_the_float64_recursion():
    """theta_hat_t = beta_t theta_hat_(t-1) + (1 - beta_t) theta_t, beta_t = (1 - 1/t)^(g + 1):
    the first update copies the parameters (beta_1 = 0), the next ones average them."""
    config = small_config(**{"mesh.data": 8})
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key)
    state, step = run.init_state(init_key), run.make_step()
    sharding = parallel.batch_sharding(run.mesh)
    leaf = lambda tree: np.asarray(tree["conv_in"]["kernel"], np.float64)  # noqa: E731
    history, profiles = [], []
    for i in range(3):
        state, _ = step(state, jax.device_put(batch_for(config, i), sharding), train_key)
        history.append(leaf(state.params))
        profiles.append([leaf(p) for p in state.power_emas])
    for j, width in enumerate(config.optim.ema_sigma_rels):
        gamma = float(dm.sigma_rel_to_gamma(width))
        expected = np.zeros_like(history[0])
        for t, params in enumerate(history, start=1):
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
            expected = beta * expected + (1.0 - beta) * params
            np.testing.assert_allclose(profiles[t - 1][j], expected, rtol=2e-5, atol=1e-7)
    np.testing.assert_array_equal(profiles[0][0], history[0])
    assert not np.allclose(profiles[2][0], profiles[2][1])


def test_warmup_then_constant_and_cosine():
    config = small_config()
    o = config.optim
    o.lr, o.warmup_steps = 1e-3, 10
    sched = state_lib.learning_rate_schedule(o, 100)
    np.testing.assert_allclose(
        [float(sched(s)) for s in (0, 5, 10, 50)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6
    )
    o.decay = "cosine"
    sched = state_lib.learning_rate_schedule(o, 110)
    np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(sched(60)), 1e-3 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    assert float(sched(110)) < 1e-9


def test_label_dropout_uses_the_null_label():
    from diffusion_jax.diffusion import make_schedule

    labels = jnp.zeros((10_000,), jnp.int32) + 3
    batch = {"image": jnp.zeros((10_000, 1, 1, 1)), "label": labels}
    out = draw_step_inputs(
        jax.random.key(0), batch, make_schedule("linear", 100), num_classes=10, cond_drop_prob=0.2
    )
    dropped = float((out["labels"] == 10).mean())
    assert abs(dropped - 0.2) < 0.02
    assert set(np.unique(np.asarray(out["labels"]))) == {3, 10}


def test_a_run_that_does_not_fit_stops_with_the_figure_and_the_knobs(monkeypatch):
    """The compiled step's memory against the device's limit, before the first step."""
    config = small_config(**{"mesh.data": 8})
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key)
    state = run.init_state(init_key)
    device = type(jax.local_devices()[0])
    monkeypatch.setattr(device, "memory_stats", lambda self: {"bytes_limit": 1024})
    with pytest.raises(
        ValueError,
        match=r"needs \d+\.\d+ GiB per device .* has 0\.00 GiB.*"
        r"model.remat=True",
    ):
        train_job.compile_and_plan_memory(run, state, train_key)


def test_a_run_of_non_finite_steps_stops_training(tmp_path, monkeypatch):
    from diffusion_jax.data import pipeline

    def nan_images(config, split):
        images = np.full((64, 8, 8, 1), np.nan, np.float32)
        return images, np.zeros(64, np.int32)

    monkeypatch.setattr(pipeline, "load_in_memory", nan_images)
    config = small_config(
        **{
            "mesh.data": 8,
            "training.num_steps": 6,
            "training.max_consecutive_nonfinite": 2,
            "training.log_every": 1,
            "training.sample_every": 100,
            "training.ckpt_every": 100,
        }
    )
    with pytest.raises(errors.NonFiniteError, match="2 consecutive steps had a non-finite loss"):
        train_job.train_and_evaluate(config, tmp_path)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert '"skipped_steps": 1' in rows[0] and '"skipped_steps": 2' in rows[1]
    # Every line is JSON (no bare NaN): the non-finite loss is null.
    assert [json.loads(row)["loss"] for row in rows] == [None, None]
