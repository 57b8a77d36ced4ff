"""The launch scripts print the commands they would run (--dry-run), and the README's
Quick start is what CI runs."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def dry_run(script, *args, env=None):
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_tpu_pod_dry_run():
    lines = dry_run(
        "tpu_pod.sh",
        "--dry-run",
        "--name=pod",
        "--zone=us-central2-b",
        "--type=v4-32",
        "--spot",
        "--",
        "--config=configs/cifar10.py",
        "--workdir=gs://b/c10",
        "--config.mesh.fsdp=4",
    )
    create, install, train = lines
    assert create.startswith("+ gcloud compute tpus tpu-vm create pod")
    assert "--accelerator-type=v4-32" in create and "--spot" in create
    assert "--worker=all" in install and "pip install -q -e '.[tpu]'" in install
    assert "--worker=all" in train and "DIFFUSION_JAX_DISTRIBUTED=1" in train
    assert "--config=configs/cifar10.py --workdir=gs://b/c10 --config.mesh.fsdp=4" in train
    queued = dry_run(
        "tpu_pod.sh",
        "--dry-run",
        "--name=pod",
        "--zone=z",
        "--queued",
        "--",
        "--config=configs/digits.py",
        "--workdir=gs://b/d",
    )
    assert queued[0].startswith("+ gcloud compute tpus queued-resources create pod-qr")


def test_slurm_dry_run():
    [line] = dry_run(
        "slurm_gpu.sbatch",
        "--dry-run",
        "--config=configs/imagenet64.py",
        "--workdir=/shared/in64",
        "--config.mesh.fsdp=8",
        env={"NNODES": "4", "HEAD_NODE": "gpu001"},
    )
    assert line.startswith("+ srun --nodes=4 --ntasks-per-node=1")
    assert "JAX_COORDINATOR_ADDRESS=gpu001:12355 JAX_NUM_PROCESSES=4" in line
    assert "JAX_PROCESS_ID=$SLURM_PROCID" in line
    assert "--config=configs/imagenet64.py --workdir=/shared/in64 --config.mesh.fsdp=8" in line


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```sh\n(.*?)```", readme, re.S).group(1)
    commands = block.strip().splitlines()
    assert len(commands) == 2
    assert "diffusion-jax --config=configs/digits.py" in commands[0]
    assert "pip install -e '.[test]'" in commands[1] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and "ruff check" in ci and "ruff format --check" in ci
