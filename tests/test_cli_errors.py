"""Bad input, as a user types it: every mistake ends the program before anything compiles
or is written, with exit status 2 and one stderr line `error: <culprit>: ...` naming it."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_COMPILE

ROOT = Path(__file__).parents[1]
DIGITS = "--config=configs/digits.py:smoke"
PREFLIGHT_SECONDS = 20  # the promise of the README's "When things go wrong"


def cli(*args, env=None):
    env = {
        **{k: v for k, v in os.environ.items() if k != "DIFFUSION_JAX_TRACEBACK"},
        "XLA_FLAGS": FAST_COMPILE,
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "diffusion_jax", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.perf_counter() - t0


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files for the cases: broken configs, garbage weights, a run with one checkpoint."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "syntax.py").write_text("def get_config(:\n")
    (root / "no_get_config.py").write_text("x = 1\n")
    (root / "raises.py").write_text("def get_config(arg=None):\n    return 1 / 0\n")
    (root / "random.msgpack").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "random.json").write_text("{}")
    (root / "truncated.pth").write_bytes(b"PK\x03\x04" + bytes(40))
    (root / "text.npz").write_text("not an npz")
    np.savez(root / "no_mu.npz", sigma=np.eye(2))
    (root / "a_file").write_text("")
    vae = root / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 50)
    (root / "pipeline").mkdir()
    return root


def cases(f: Path, workdir: Path):
    """(arguments, text the one line must contain) for each mistake, by category."""
    w = f"--workdir={workdir}"
    ae = "--config.autoencoder.weights"
    no_eval = "--config.training.eval_at_end=False"
    # digits smoke in the latent space of an autoencoder with one downsampling: 8x8 latents.
    latent = ["--config.sampling.clip_denoised=False", "--config.autoencoder.ch_mult=(1,2)"]
    return [
        # The overrides.
        ([DIGITS, w, "--config.training.batchsize=8"], "did you mean --config.training.batch_size"),
        ([DIGITS, w, "--config.trainin.batch_size=8"], "did you mean --config.training.batch_size"),
        ([DIGITS, w, "--config.training.batch_size=abc"], "expects an integer"),
        ([DIGITS, w, "--config.training.batch_size=1.5"], "--config.training.batch_size=1.5"),
        ([DIGITS, w, "--config.optim.lr=fast"], "expects a number"),
        ([DIGITS, w, "--config.model.ch_mult=(1,x)"], "expects a tuple"),
        ([DIGITS, w, "--config.training.eval_at_end=maybe"], "expects True or False"),
        # The config file and the other flags.
        (["--config=configs/nope.py", w], "--config=configs/nope.py: no such file"),
        (["--config=configs/digit.py", w], "did you mean configs/digits.py"),
        ([f"--config={f / 'syntax.py'}", w], "syntax error"),
        ([f"--config={f / 'no_get_config.py'}", w], "defines no get_config"),
        ([f"--config={f / 'raises.py'}", w], "ZeroDivisionError"),
        (["--config=configs/digits.py:smok", w], "unknown option(s) ['smok']"),
        ([DIGITS], "--workdir: required"),
        ([w], "--config: required"),
        ([DIGITS, f"--workdr={workdir}"], "did you mean --workdir"),
        ([DIGITS, w, "--mode=trian"], "--mode=trian"),
        ([DIGITS, w, "extra"], "extra: unexpected argument"),
        # Field ranges and cross-field rules.
        ([DIGITS, w, "--config.training.batch_size=-8"], "config.training.batch_size: must be"),
        ([DIGITS, w, "--config.training.batch_size=0"], "config.training.batch_size: must be"),
        ([DIGITS, w, "--config.training.num_steps=0"], "config.training.num_steps: must be"),
        ([DIGITS, w, "--config.sampling.num_samples=0"], "config.sampling.num_samples"),
        ([DIGITS, w, "--config.optim.lr=-1.0"], "config.optim.lr: must be >= 0"),
        ([DIGITS, w, "--config.model.attn_resolutions=(5,)"], "config.model.attn_resolutions"),
        ([DIGITS, w, "--config.training.grad_accum=3"], "config.training.batch_size"),
        ([DIGITS, w, "--config.diffusion.schedule=cosin"], "config.diffusion.schedule"),
        ([DIGITS, w, "--config.sampling.sampler=dim"], "config.sampling.sampler"),
        ([DIGITS, w, "--config.training.cond_drop_prob=1.5"], "config.training.cond_drop_prob"),
        # Evaluation metrics and their inputs.
        ([DIGITS, w, '--config.eval.metrics=("fdi",)'], "config.eval.metrics: unknown 'fdi'"),
        ([DIGITS, w, '--config.eval.metrics=("fid",)'], "config.eval.inception_weights"),
        (
            [
                DIGITS,
                w,
                '--config.eval.metrics=("is",)',
                f"--config.eval.inception_weights={f / 'truncated.pth'}",
            ],
            "config.eval.inception_weights",
        ),
        (
            [
                DIGITS,
                w,
                '--config.eval.metrics=("fid",)',
                f"--config.eval.inception_weights={f / 'missing.pth'}",
            ],
            "missing.pth: no such file",
        ),
        # The data.
        (
            ["--config=configs/cifar10.py:smoke", w],
            "config.data.dataset: 'cifar10' is not prepared",
        ),
        (
            [DIGITS, w, "--config.data.dataset=synthetic"],
            "config.eval.metrics: digits_fd scores digits",
        ),
        (
            [DIGITS, w, no_eval, "--config.data.dataset=folder", f"--config.data.data_dir={f}"],
            "config.data.data_dir: no images",
        ),
        (
            [DIGITS, w, no_eval, "--config.data.dataset=folder", "--config.data.data_dir=/none"],
            "config.data.data_dir",
        ),
        # The workdir.
        ([DIGITS, f"--workdir={f / 'a_file'}"], "is a file, not a directory"),
        ([DIGITS, w, "--mode=eval"], "no checkpoint to read"),
        ([DIGITS, f"--workdir={f / 'misspelled'}", "--mode=sample"], "no checkpoint to read"),
        ([DIGITS, w, "--mode=export"], "no checkpoint to read"),
        # The files the config names.
        (
            [DIGITS, w, "--mode=eval", f"--config.eval.params_file={f / 'random.msgpack'}"],
            "config.eval.params_file",
        ),
        (
            [DIGITS, w, "--mode=sample", f"--config.eval.params_file={f / 'gone.msgpack'}"],
            "gone.msgpack: no such file",
        ),
        (
            [DIGITS, w, f"{ae}={f / 'vae'}", *latent],
            "config.autoencoder.weights",
        ),
        (
            [DIGITS, w, f"{ae}={f / 'nothing'}", *latent],
            "does not exist",
        ),
        ([DIGITS, w, f"--config.text_encoder.weights={f}"], "config.text_encoder.weights"),
        (
            [
                "--config=configs/sd15_sample.py",
                w,
                "--mode=sample",
                f"--config.pretrained={f / 'pipeline'}",
            ],
            "config.pretrained",
        ),
        ([DIGITS, w, "--mode=encode"], "--mode=encode needs an autoencoder"),
    ]


def test_every_mistake_ends_in_one_line_before_anything_is_written(files, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    table = cases(files, workdir)
    assert len(table) >= 30
    before_files = tree(files)
    failures = []
    for args, culprit in table:
        result, seconds = cli(*args)
        lines = result.stderr.strip().splitlines()
        problems = []
        if result.returncode != 2:
            problems.append(f"exit {result.returncode}")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"{len(lines)} stderr lines")
        if lines and culprit not in lines[-1]:
            problems.append(f"does not name {culprit!r}")
        if "Traceback" in result.stderr:
            problems.append("a traceback")
        if seconds > PREFLIGHT_SECONDS:
            problems.append(f"took {seconds:.0f} s")
        if tree(workdir) or tree(files) != before_files:
            problems.append(f"wrote {tree(workdir)}")
        if problems:
            failures.append(f"{' '.join(args[-2:])}: {', '.join(problems)}: {result.stderr[-600:]}")
    assert not failures, "\n".join(failures)


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path):
    """Permission bits do not stop root: an immutable folder (chattr +i) does."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    folder = workdir / "checkpoints"
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    try:
        result, _ = cli(DIGITS, f"--workdir={workdir}")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --workdir={workdir}: cannot write in {folder} (permissions, or a read-only "
        "file system); fix it or use another --workdir"
    ]


def test_the_traceback_variable_adds_the_traceback(tmp_path):
    result, _ = cli(
        DIGITS,
        f"--workdir={tmp_path}",
        "--config.training.num_steps=0",
        env={"DIFFUSION_JAX_TRACEBACK": "1"},
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config.training.num_steps")


def test_help_lists_the_flags_modes_and_examples():
    result, _ = cli("--help")
    assert result.returncode == 0
    for text in ("--config", "--workdir", "--mode", "encode", "examples:", "Exit"):
        assert text in result.stdout
    assert result.stdout.count("diffusion-jax --config=") >= 3


def test_the_readme_table_of_exit_statuses_is_the_programs():
    """The statuses README.md's "When things go wrong" promises are main.py's, and each one
    is asserted by a test (2 and 143 here; 1, 130 and 0 after SIGTERM in test_faults.py)."""
    from diffusion_jax import main

    text = (ROOT / "README.md").read_text()
    section = text.split("### When things go wrong", 1)[1].split("\n#", 1)[0]
    statuses = {int(s) for s in re.findall(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert statuses == {
        0,
        main.EXIT_FAULT,
        main.EXIT_BAD_INPUT,
        main.EXIT_INTERRUPTED,
        main.EXIT_TERMINATED,
    }
    assert "`error: <field or path>: what is wrong; what to do`" in section
    assert main.TRACEBACK_ENV in section


def test_eval_and_sample_refuse_a_model_other_than_the_workdirs(tmp_path, monkeypatch):
    """The checkpoints of a workdir were trained with its config.json: scoring them with
    another schedule or model would restore or sample the wrong thing."""
    from test_configs import load_config

    from diffusion_jax import preflight
    from diffusion_jax.errors import ConfigError

    trained = load_config("digits.py", "smoke")
    (tmp_path / "config.json").write_text(trained.to_json_best_effort())
    monkeypatch.setattr(preflight.workdir, "check_has_checkpoint", lambda config, workdir: None)
    preflight.check(trained, tmp_path, "eval")  # the same settings pass
    other = trained.copy_and_resolve_references()
    other.diffusion.schedule = "linear"
    for mode in ("eval", "sample", "export"):
        with pytest.raises(ConfigError, match="config.diffusion.schedule: 'linear' differs"):
            preflight.check(other, tmp_path, mode)
