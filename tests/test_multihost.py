"""Two processes x 4 fake CPU devices through jax.distributed on loopback, launched by
launch/multiprocess_local.sh, against one process with 8 fake devices: data x fsdp x tensor,
the data axis across the processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
from conftest import FAST_COMPILE
from test_checkpointing import committed_steps
from test_configs import load_config

from diffusion_jax import checkpointing
from diffusion_jax.run import run_keys, setup_run

ROOT = Path(__file__).parents[1]
SMOKE = [
    "--config=configs/digits.py:smoke",
    "--config.training.eval_at_end=False",
    "--config.training.sample_every=100000",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(workdir, *extra):
    env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": FAST_COMPILE}
    cmd = [
        "bash",
        str(ROOT / "launch" / "multiprocess_local.sh"),
        "--processes=2",
        "--devices-per-process=4",
        f"--port={free_port()}",
        "--",
        f"--workdir={workdir}",
        *SMOKE,
        *extra,
    ]
    return cmd, env


def losses(workdir):
    rows = [
        json.loads(line)
        for line in (Path(workdir) / "metrics.jsonl").read_text().split("\n")
        if line
    ]
    return {r["step"]: r["loss"] for r in rows}


def single_process(workdir, *extra):
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_jax", f"--workdir={workdir}", *SMOKE, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_dry_run_prints_one_command_per_process():
    cmd, env = launcher("/tmp/x", "--config.mesh.fsdp=2")
    cmd.insert(2, "--dry-run")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert f"JAX_PROCESS_ID={i}" in line and "JAX_NUM_PROCESSES=2" in line
        assert "--xla_force_host_platform_device_count=4" in line
        assert "--config.mesh.fsdp=2" in line and "--workdir=/tmp/x" in line


def test_two_processes_match_one_process_and_survive_sigterm(tmp_path):
    reference = tmp_path / "single"
    single_process(reference, "--config.training.num_steps=3")
    expected = losses(reference)

    # data=2 x fsdp=2 x tensor=2 across the two processes (each holds one data row of the
    # mesh, 'tensor' inside it) gives the single process's losses; stopped by SIGTERM, then
    # resumed.
    sharded = tmp_path / "sharded"
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    cmd, env = launcher(
        sharded,
        *mesh,
        "--config.training.num_steps=100000",
        "--config.training.ckpt_every=100000",
    )
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    start = time.time()
    while not ((sharded / "metrics.jsonl").exists() and len(losses(sharded)) >= 3):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < 300
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it to both processes
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "mesh data=2 x fsdp=2 x tensor=2" in out
    assert "[p1]" in out and "process 0/2" in out
    [saved] = committed_steps(sharded)
    got = losses(sharded)
    for step, loss in expected.items():
        np.testing.assert_allclose(got[step], loss, rtol=1e-5)

    # The checkpoint both processes wrote restores in this single process (8 devices) on
    # another mesh, without 'tensor'.
    config = load_config("digits.py", "smoke")
    config.mesh.data, config.mesh.fsdp = 4, 2
    run = setup_run(config, run_keys(config)[0])
    manager = checkpointing.make_manager(sharded, read_only=True)
    step, state, _ = checkpointing.restore_latest(manager, run.abstract_state)
    assert step == saved and int(state.step) == saved
    assert all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree.leaves(state.ema_params))

    cmd, env = launcher(sharded, *mesh, f"--config.training.num_steps={saved + 2}")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert max(losses(sharded)) == saved + 2
