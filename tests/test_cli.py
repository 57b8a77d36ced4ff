"""The command line, end to end in a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_COMPILE

ROOT = Path(__file__).parents[1]


def run_cli(*args, timeout=600, fast_compile=True, cwd=ROOT, env=None):
    """The command in a subprocess on one CPU device (`env`, when given, is its whole
    environment). fast_compile trades run time for compile time (XLA's lowest optimisation
    level): right for a few steps, not for hundreds."""
    if env is None:
        flags = FAST_COMPILE if fast_compile else ""
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "diffusion_jax", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def digits_smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_smoke")
    result = run_cli(
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        "--config.model.dropout=0.2",
        "--config.training.eval_at_end=False",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_end_to_end_writes_every_output(digits_smoke_run):
    workdir, result = digits_smoke_run
    assert (workdir / "config.json").exists()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "grad_norm", "lr", "steps_per_sec", "images_per_sec", "skipped_steps"):
        assert key in rows[-1], key
    assert (workdir / "checkpoints" / "2").is_dir()
    assert (workdir / "samples" / "step_2.png").exists()
    assert np.load(workdir / "samples" / "step_2.npz")["arr_0"].shape == (8, 16, 16, 1)
    assert list((workdir / "tensorboard").iterdir())
    assert "ETA" in result.stderr and "steps/s" in result.stderr


def test_override_is_written_to_config_json(digits_smoke_run):
    workdir, _ = digits_smoke_run
    assert json.loads((workdir / "config.json").read_text())["model"]["dropout"] == 0.2


def test_restart_resumes_from_the_last_checkpoint(digits_smoke_run, tmp_path):
    workdir, _ = digits_smoke_run
    result = run_cli(
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        "--config.model.dropout=0.2",
        "--config.training.num_steps=3",
        "--config.training.eval_at_end=False",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_bad_override_names_the_field(tmp_path):
    result = run_cli(
        "--config=configs/digits.py:smoke", f"--workdir={tmp_path}", "--config.model.chanels=3"
    )
    assert result.returncode != 0
    assert "chanels" in result.stderr
    result = run_cli(
        "--config=configs/digits.py:smoke",
        f"--workdir={tmp_path}",
        "--config.diffusion.schedule=quadratic",
    )
    assert result.returncode == 2
    assert "config.diffusion.schedule" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "checkpoints").exists()


def test_changed_model_config_refuses_to_resume(digits_smoke_run):
    workdir, _ = digits_smoke_run
    result = run_cli(
        "--config=configs/digits.py:smoke", f"--workdir={workdir}", "--config.model.ch=16"
    )
    assert result.returncode == 2
    assert "config.model.ch" in result.stderr and "allow_config_change" in result.stderr


def test_text_to_image_from_a_pipeline_folder(tmp_path):
    common = ["--config=configs/sd15_sample.py", f"--workdir={tmp_path}", "--mode=sample"]
    result = run_cli(
        *common,
        "--config.pretrained=tests/fixtures/tiny_sd",
        "--config.sampling.num_steps=3",
        "--config.sampling.num_samples=2",
        "--config.sampling.prompt=a fox in the snow",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = np.load(tmp_path / "samples" / "prompt_0.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert (tmp_path / "samples" / "prompt_0.png").exists()
    settings = json.loads((tmp_path / "samples" / "prompt_0.json").read_text())
    assert settings["prompt"] == "a fox in the snow" and settings["num_steps"] == 3
    # A missing pipeline folder fails in one line naming what is missing.
    result = run_cli(*common, f"--config.pretrained={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    assert "model_index.json does not exist" in result.stderr.strip().splitlines()[-1]
