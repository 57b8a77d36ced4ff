"""Checkpoints that lose nothing: kill and resume, SIGTERM, other topologies, bad files,
EMA-only restore and export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE
from helpers import tiny_config

from diffusion_jax import checkpointing, export, parallel
from diffusion_jax.errors import ConfigError
from diffusion_jax.run import run_keys, setup_run

ROOT = Path(__file__).parents[1]
SMOKE = [
    "--config=configs/digits.py:smoke",
    "--config.training.eval_at_end=False",
    "--config.training.sample_every=100000",
    "--config.training.log_every=5",
]


def cli(workdir, *extra):
    env = {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}
    return [sys.executable, "-m", "diffusion_jax", f"--workdir={workdir}", *SMOKE, *extra], env


def run_cli(workdir, *extra, timeout=600):
    cmd, env = cli(workdir, *extra)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def committed_steps(workdir):
    ckpt = Path(workdir) / "checkpoints"
    if not ckpt.exists():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def restore_host(workdir, step):
    manager = checkpointing.make_manager(workdir, read_only=True)
    return jax.tree.map(np.asarray, manager.restore(step)["state"])


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    steps = ["--config.training.num_steps=20", "--config.training.ckpt_every=5"]
    straight = tmp_path / "straight"
    run_cli(straight, *steps)

    killed = tmp_path / "killed"
    cmd, env = cli(killed, *steps)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: 5 in committed_steps(killed), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(committed_steps(killed)) < 20
    run_cli(killed, *steps)

    a, b = restore_host(straight, 20), restore_host(killed, 20)
    for key in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True):
            np.testing.assert_array_equal(x, y)
    # The rows the killed run logged past its last checkpoint were dropped, then logged again.
    assert logged_losses(killed) == logged_losses(straight)
    assert [s for s, _ in logged_losses(killed)] == [5, 10, 15, 20]


def logged_losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd, env = cli(
        tmp_path, "--config.training.num_steps=100000", "--config.training.ckpt_every=100000"
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    steps = committed_steps(tmp_path)
    assert len(steps) == 1 and steps[0] >= 5
    assert "SIGTERM" in stderr


def trained_state(config, devices, num_steps=1):
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key, devices)
    state, step = run.init_state(init_key), run.make_step()
    rng = np.random.default_rng(0)
    for _ in range(num_steps):
        batch = {
            "image": rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32),
            "label": np.zeros(16, np.int32),
        }
        state, _ = step(state, jax.device_put(batch, parallel.batch_sharding(run.mesh)), train_key)
    return state, run


def mesh_config(data, fsdp):
    config = tiny_config(ch=16)
    config.training.batch_size = 16
    config.mesh.data, config.mesh.fsdp = data, fsdp
    return config


@pytest.fixture(scope="module")
def saved_on_8(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("topology")
    state, run = trained_state(mesh_config(4, 2), jax.devices())
    kernel = state.params["up_blocks_0.resnets_0"]["conv1"]["kernel"]
    assert not kernel.sharding.is_fully_replicated
    manager = checkpointing.make_manager(workdir)
    checkpointing.save(manager, 1, state, {"step": 1})
    manager.wait_until_finished()
    return workdir, jax.tree.map(np.asarray, state), run


@pytest.mark.parametrize("data,fsdp,num_devices", [(8, 1, 8), (2, 1, 2), (1, 2, 2), (1, 1, 1)])
def test_restore_on_another_topology(saved_on_8, data, fsdp, num_devices):
    workdir, expected, saved_run = saved_on_8
    config = mesh_config(data, fsdp)
    init_key, _, _ = run_keys(config)
    run = setup_run(config, init_key, jax.devices()[:num_devices])
    manager = checkpointing.make_manager(workdir, read_only=True)
    step, state, _ = checkpointing.restore_latest(manager, run.abstract_state)
    assert step == 1
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    assert {d.id for d in jax.tree.leaves(state.params)[0].devices()} <= {
        d.id for d in jax.devices()[:num_devices]
    }
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32)
    t = np.array([5, 500])
    np.testing.assert_allclose(
        run.model.apply({"params": state.ema_params}, x, t),
        saved_run.model.apply({"params": expected.ema_params}, x, t),
        atol=1e-6,
    )
    ema = checkpointing.restore_ema(manager, 1, run.abstract_state.ema_params)
    for x, y in zip(jax.tree.leaves(ema), jax.tree.leaves(expected.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)


def test_truncated_checkpoint_is_skipped_with_a_warning(saved_on_8, tmp_path, caplog):
    workdir, expected, _ = saved_on_8
    shutil.copytree(workdir / "checkpoints" / "1", tmp_path / "checkpoints" / "1")
    shutil.copytree(workdir / "checkpoints" / "1", tmp_path / "checkpoints" / "2")
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    config = mesh_config(8, 1)
    run = setup_run(config, run_keys(config)[0])
    manager = checkpointing.make_manager(tmp_path, read_only=True)
    with caplog.at_level("WARNING"):
        step, state, _ = checkpointing.restore_latest(manager, run.abstract_state)
    assert step == 1
    assert any("checkpoints/2" in r.message and "unreadable" in r.message for r in caplog.records)
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(state.params)[0]), jax.tree.leaves(expected.params)[0]
    )


def test_checkpoint_of_another_model_names_the_parameter(saved_on_8):
    workdir, _, _ = saved_on_8
    config = mesh_config(8, 1)
    config.model.ch = 8
    run = setup_run(config, run_keys(config)[0])
    manager = checkpointing.make_manager(workdir, read_only=True)
    with pytest.raises(ConfigError, match=r"parameter \S+ has shape .* expects"):
        checkpointing.restore_latest(manager, run.abstract_state)


def test_export_then_sample_from_the_file(tmp_path):
    run_cli(tmp_path, "--config.training.num_steps=2")
    run_cli(tmp_path, "--mode=export")
    exported = tmp_path / "export" / "ema_step_2.msgpack"
    params, config = export.load_params(exported)
    manager = checkpointing.make_manager(tmp_path, read_only=True)
    stored = manager.restore(2)["state"]["ema_params"]
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(stored), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert config.model.ch == 8
    other = tmp_path / "elsewhere"
    run_cli(other, "--mode=sample", f"--config.eval.params_file={exported}")
    # Named after the file, not a step it was not trained to here.
    assert (other / "samples" / "sample_file_ema_step_2.png").exists()
    with np.load(other / "samples" / "sample_file_ema_step_2.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (8, 16, 16, 1)
        assert str(f["ema"]) == f"the parameters of eval.params_file={exported}"


def test_a_failed_save_is_checkpoint_error_on_an_orbax_without_its_private_module(
    tmp_path, monkeypatch
):
    """orbax_compat's workaround for orbax's waiting threads uses orbax's private signaling
    client; where that module is missing it does nothing, and a failed save still ends in
    CheckpointError (not ImportError)."""
    import errno

    import orbax.checkpoint as ocp
    from orbax.checkpoint._src import futures

    from diffusion_jax import errors

    private = "orbax.checkpoint._src.futures.signaling_client"
    monkeypatch.setitem(sys.modules, private, None)  # `import` of it raises ImportError
    monkeypatch.delattr(futures, "signaling_client", raising=False)
    original = ocp.JsonCheckpointHandler._save_fn

    async def full_disk(self, meta, directory):
        if meta["step"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, meta, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
    saver = checkpointing.Saver(checkpointing.make_manager(tmp_path))
    state = {"w": np.arange(4, dtype=np.float32)}
    saver.save(1, state, {"step": 1})
    saver.wait()
    with pytest.raises(errors.CheckpointError, match="checkpoint 2: could not write") as e:
        saver.save(2, state, {"step": 2})
        saver.wait()
    assert "No space left on device" in str(e.value) and "from checkpoint 1" in str(e.value)
    assert committed_steps(tmp_path) == [1]
