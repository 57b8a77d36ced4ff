"""The EMA, eval, sample and export workflow as the README documents it: its own commands,
verbatim on a smoke-sized run, and every setting either used or refused in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_cli import ROOT, run_cli
from test_configs import load_config

from diffusion_jax import preflight, weights
from diffusion_jax.errors import ConfigError
from diffusion_jax.evaluation import evaluate
from diffusion_jax.jobs import export_ema, posthoc_ema, sample
from diffusion_jax.jobs import train as train_job

README = ROOT / "README.md"


def readme_ema_commands() -> list[str]:
    """The shell commands of the README's post-hoc EMA section, continuation lines joined
    and comments dropped, as a user pastes them."""
    text = README.read_text()
    section = text.split("### EMA length after training (post-hoc EMA)")[1].split("\n### ")[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\s*(#[^\n]*)?\n\s*", " ", block)
        commands += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return commands


def smoke(command: str, workdir: Path) -> list[str]:
    """A README command on the smoke recipe in `workdir`, every other flag as written."""
    assert command.startswith("diffusion-jax --config=configs/digits.py --workdir=runs/digits_ema")
    args = command.split()[1:]
    args[0] = "--config=configs/digits.py:smoke"
    args[1] = f"--workdir={workdir}"
    return [a.replace("'", "") for a in args]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """(workdir, [(command, result)]) of the README's EMA commands, in order."""
    workdir = tmp_path_factory.mktemp("ema_readme") / "digits"
    done = []
    for command in readme_ema_commands():
        result = run_cli(*smoke(command, workdir))
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        done.append((command, result))
    return workdir, done


def config_of(workdir, mode: str, **fields):
    """The resolved smoke config of `mode` on `workdir`, "section.field" overrides as keywords
    with __ for the dot."""
    config = load_config("digits.py", "smoke")
    for key, value in fields.items():
        section, field = key.split("__")
        config[section][field] = value
    return preflight.resolve(config, workdir, mode, num_devices=8)


def test_the_readme_commands_do_what_it_says(readme_run):
    workdir, done = readme_run
    modes = [re.search(r"--mode=(\w+)", c).group(1) if "--mode" in c else "train" for c, _ in done]
    assert modes[:3] == ["train", "posthoc_ema", "eval"], modes
    assert {"sample", "export"} <= set(modes)
    # The sweep: one rebuilt file and one result per width, and the curve.
    curve = json.loads((workdir / "posthoc_ema" / "curve_step_2.json").read_text())
    assert [row["sigma_rel"] for row in curve] == [0.03, 0.05, 0.07, 0.1, 0.15, 0.2]
    assert (workdir / "posthoc_ema" / "sigma_rel_0.0700_step_2.msgpack").exists()
    # Extrapolated widths are said to be.
    posthoc_log = done[1][1].stderr
    assert "width 0.03 is outside the tracked widths [0.05, 0.1]" in posthoc_log
    assert "width 0.07 is outside" not in posthoc_log
    # The eval of 0.07 after the sweep finds the sweep's result: nothing sampled again.
    eval_log = done[2][1].stderr
    assert "nothing new to score" in eval_log and "width 0.07 rebuilt at step 2" in eval_log
    results = [json.loads(p.read_text()) for p in (workdir / "eval").glob("*.json")]
    assert sorted(r["ema"] for r in results).count("power sigma_rel=0.07 (posthoc)") == 1
    # Sample and export name the width they used, in the file and in the log.
    assert (workdir / "samples" / "sample_sigma_rel_0.0700_step_2.png").exists()
    record = json.loads((workdir / "samples" / "sample_sigma_rel_0.0700_step_2.json").read_text())
    assert record["ema"] == "the EMA of width 0.07 rebuilt at step 2 (--mode=posthoc_ema)"
    assert record["sampler"] == "dpm_solver++_sde" and record["nfe"] >= 1
    assert (workdir / "export" / "ema_sigma_rel_0.0700_step_2.msgpack").exists()
    sample_log = next(r.stderr for c, r in done if "--mode=sample" in c)
    assert "width 0.07 rebuilt at step 2" in sample_log and "dpm_solver++_sde" in sample_log


def test_exports_of_different_averages_do_not_overwrite(readme_run, tmp_path):
    workdir, _ = readme_run
    paths = {
        width: export_ema.export_ema(
            config_of(workdir, "export", eval__ema_sigma_rel=width), workdir
        )
        for width in (0.0, 0.05)
    }
    assert paths[0.0].name == "ema_step_2.msgpack"
    assert paths[0.05].name == "ema_sigma_rel_0.0500_step_2.msgpack"
    assert (workdir / "export" / "ema_sigma_rel_0.0700_step_2.msgpack").exists()


def test_eval_of_a_params_file_on_a_fresh_workdir(readme_run, tmp_path):
    workdir, _ = readme_run
    exported = workdir / "export" / "ema_sigma_rel_0.0700_step_2.msgpack"
    config = config_of(tmp_path, "eval", eval__params_file=str(exported))
    preflight.check(config, tmp_path, "eval")
    (result,) = evaluate.evaluate(config, tmp_path)
    written = json.loads((tmp_path / "eval" / f"file_{exported.stem}.json").read_text())
    assert written["params_file"] == str(exported) and written["step"] is None
    assert written["digits_fd"] == result["digits_fd"] > 0
    assert evaluate.evaluate(config, tmp_path) == []  # scored once


def test_a_stale_rebuild_is_refused_and_a_resume_keeps_snapshotting(readme_run, tmp_path):
    """A resume with the first command but not its EMA flags keeps tracking and snapshotting
    (config.json decides them); the rebuild of the earlier step is then stale."""
    workdir, _ = readme_run
    resumed = tmp_path / "digits"
    shutil.copytree(workdir, resumed)
    config = config_of(resumed, "train", training__num_steps=4)
    assert tuple(config.optim.ema_sigma_rels) == (0.05, 0.1)
    assert config.training.ema_snapshot_every == 100
    train_job.train_and_evaluate(config, resumed)
    assert weights.snapshot_steps(resumed) == [2, 4]
    config = config_of(resumed, "sample", eval__ema_sigma_rel=0.07)
    with pytest.raises(ConfigError, match=r"rebuilt at step 2, but the snapshots go on to step 4"):
        preflight.check(config, resumed, "sample")
    # Asked for by its step, the older rebuild is used, though checkpoint 2 is gone.
    shutil.rmtree(resumed / "checkpoints" / "2", ignore_errors=True)
    config = config_of(resumed, "sample", eval__ema_sigma_rel=0.07, eval__checkpoint_step=2)
    preflight.check(config, resumed, "sample")
    assert sample.sample(config, resumed).name == "sample_sigma_rel_0.0700_step_2.png"


def refused(*args, message: str) -> None:
    """The command, as a user types it, ends in one `error:` line matching `message`, exit 2."""
    result = run_cli(*args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, lines[-1]) and lines[-1].startswith("error: "), lines[-1]


def test_posthoc_at_a_step_without_a_snapshot_is_one_line(readme_run):
    workdir, _ = readme_run
    refused(
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        "--mode=posthoc_ema",
        "--config.eval.ema_sigma_rel=0.07",
        "--config.eval.checkpoint_step=1",
        message=r"^error: config.eval.checkpoint_step: no EMA snapshot at step 1",
    )


def test_other_tracked_widths_are_refused_with_the_right_advice(readme_run):
    workdir, _ = readme_run
    refused(
        "--config=configs/digits.py:smoke",
        f"--workdir={workdir}",
        "--mode=eval",
        "--config.optim.ema_sigma_rels=(0.05,)",
        message=r"leave optim.ema_sigma_rels unset",
    )


def test_eval_scores_each_width_of_a_sweep(readme_run):
    workdir, _ = readme_run
    config = config_of(workdir, "eval", eval__ema_sigma_rels=(0.05, 0.07))
    scored = evaluate.evaluate(config, workdir)
    # 0.07 was scored by the sweep already; the tracked 0.05 straight from the checkpoint.
    assert [r["ema"] for r in scored] == ["power sigma_rel=0.05 (tracked)"]


@pytest.mark.parametrize(
    "arg, fields, message",
    [
        (
            "uncond,smoke",
            {"sampling.guidance_scale": 3.0},
            r"^config.sampling.guidance_scale: .*unconditional",
        ),
        ("smoke", {"sampling.prompt": "a seven"}, r"^config.sampling.prompt: .*text"),
        (
            "smoke",
            {"training.cond_drop_prob": 0.0, "sampling.guidance_scale": 2.0},
            r"^config.training.cond_drop_prob: must be > 0 for guidance",
        ),
    ],
)
def test_settings_that_cannot_apply_are_refused(arg, fields, message, tmp_path):
    refused(
        f"--config=configs/digits.py:{arg}",
        f"--workdir={tmp_path}",
        "--mode=sample",
        *[f"--config.{key}={value}" for key, value in fields.items()],
        message=message.replace("^", "^error: ", 1),
    )
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_posthoc_sweep_is_not_scored_twice(readme_run, caplog):
    workdir, _ = readme_run
    config = config_of(workdir, "posthoc_ema", eval__ema_sigma_rels=(0.07,))
    with caplog.at_level("INFO", logger="diffusion_jax"):
        (record,) = posthoc_ema.posthoc_ema(config, workdir)
    assert "already scored" in caplog.text and record["digits_fd"] > 0
