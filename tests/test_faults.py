"""Faults of a training run lose nothing and never hang, and its logs stay honest: a save that
cannot be written (read-only folder, full disk) ends the run with one line; SIGINT and
SIGTERM finish the save in flight, write the current step and stop (no evaluation after);
a corrupt newest checkpoint is moved aside for every mode; metrics.jsonl is JSON with one
row per step; the logged rate counts training steps only."""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from test_checkpointing import ROOT, cli, committed_steps, run_cli, wait_for

from diffusion_jax import checkpointing, errors, metrics_io
from diffusion_jax.jobs import train as train_job

NO_HANG = 60  # seconds: the one timed bound, far above the few seconds these paths take


def start_cli(workdir, *extra):
    cmd, env = cli(workdir, *extra)
    env.pop("DIFFUSION_JAX_TRACEBACK", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)


def message_lines(stderr: str) -> list[str]:
    """stderr without the log lines (`I1130 12:00:00.000 ...`)."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not (line[:1] in "IWEF" and line[1:5].isdigit())
    ]


def leftovers(workdir) -> list[str]:
    return [p.name for p in (Path(workdir) / "checkpoints").glob("*orbax-checkpoint-tmp*")]


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` refuses new entries, for root too (whom permissions do not stop: the
    immutable flag does)."""
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        folder.chmod(mode)
        pytest.skip("running as root without chattr: cannot make a folder read-only")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(mode)


# --- a checkpoint that cannot be written ----------------------------------------------------


def test_read_only_checkpoints_end_the_run_with_one_line(tmp_path):
    with unwritable(tmp_path):  # skips here, before a run starts, where it cannot work
        pass
    proc = start_cli(
        tmp_path, "--config.training.num_steps=100000", "--config.training.ckpt_every=5"
    )
    wait_for(lambda: 5 in committed_steps(tmp_path), proc)
    with unwritable(tmp_path / "checkpoints"):
        before = committed_steps(tmp_path)
        _, stderr = proc.communicate(timeout=NO_HANG)
        after = committed_steps(tmp_path)
    assert proc.returncode != 0
    lines = message_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "could not write" in lines[0] and "it resumes from checkpoint" in lines[0]
    # A save started before the folder turned read-only may leave its temporary folder,
    # which nothing can remove from a read-only folder; the next run clears it.
    assert after == before
    manager = checkpointing.make_manager(tmp_path, read_only=True)
    assert manager.restore(max(before))["meta"]["step"] == max(before)


# The command line with orbax's JSON writer patched to do {action} while it writes step 10.
PATCHED_SAVE = """
import asyncio, errno, os, runpy, signal
import orbax.checkpoint as ocp

original = ocp.JsonCheckpointHandler._save_fn

async def patched(self, meta, directory):
    if meta["step"] == 10:
{action}
    return await original(self, meta, directory)

ocp.JsonCheckpointHandler._save_fn = patched
runpy.run_module("diffusion_jax", run_name="__main__", alter_sys=True)
"""
FULL_DISK = """
        (directory / "metadata").write_text('{"half a')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
"""
CTRL_C = """
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.3)  # the save is still in flight when the loop sees the signal
"""


def run_patched(workdir, action):
    cmd, env = cli(workdir, "--config.training.num_steps=100000", "--config.training.ckpt_every=5")
    env.pop("DIFFUSION_JAX_TRACEBACK", None)
    cmd[1:3] = ["-c", PATCHED_SAVE.replace("{action}", action.strip("\n"))]  # not -m
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=NO_HANG + 60
    )


def test_a_full_disk_ends_the_run_with_checkpoint_error(tmp_path):
    """ENOSPC in the middle of the background writes of step 10."""
    result = run_patched(tmp_path, FULL_DISK)
    assert result.returncode != 0
    lines = message_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert f"checkpoint 10: could not write {checkpoints}: No space left on device; " in lines[0]
    assert "free space" in lines[0] and "it resumes from checkpoint 5" in lines[0]
    assert committed_steps(tmp_path) == [5] and not leftovers(tmp_path)


# --- signals --------------------------------------------------------------------------------


def test_the_first_signal_asks_to_stop_and_the_second_aborts():
    before = signal.getsignal(signal.SIGINT)
    with train_job.Preemption() as preemption:
        assert not preemption.check(1)
        signal.raise_signal(signal.SIGINT)
        assert preemption.check(2) and preemption.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second Ctrl-C kills
    assert signal.getsignal(signal.SIGINT) is before
    stopped = errors.Stopped("SIGINT", 7)
    assert (stopped.signal_name, stopped.step) == ("SIGINT", 7)
    assert str(stopped) == (
        "stopped by SIGINT at step 7 after saving a checkpoint; the same command resumes"
    )


def test_sigint_during_a_save_finishes_it_saves_the_step_and_stops(tmp_path):
    """Ctrl-C while step 10 is being written: step 10 is completed, the step after it is
    saved too, the run stops (status 130), and the same command resumes from there."""
    result = run_patched(tmp_path, CTRL_C)
    assert result.returncode == 130, result.stderr[-3000:]
    (line,) = message_lines(result.stderr)
    stop = re.fullmatch(
        r"stopped by SIGINT at step (\d+) after saving a checkpoint; the same command resumes",
        line,
    )
    step = int(stop[1])
    assert step in (11, 12) and committed_steps(tmp_path)[-2:] == [10, step]
    assert not leftovers(tmp_path)
    meta = tmp_path / "checkpoints" / str(step) / "meta" / "metadata"
    assert json.loads(meta.read_text())["data_position"] == step

    rerun = run_cli(tmp_path, f"--config.training.num_steps={step + 1}")
    assert f"restored step {step} from" in rerun.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 10, step, step + 1]


@pytest.fixture(scope="module")
def stopped_by_sigterm(tmp_path_factory):
    """(workdir, exit status, stderr) of a run with eval_at_end=True stopped by SIGTERM after
    a few checkpoints."""
    workdir = tmp_path_factory.mktemp("sigterm")
    proc = start_cli(
        workdir,
        "--config.training.num_steps=100000",
        "--config.training.ckpt_every=5",
        "--config.training.eval_at_end=True",
    )
    wait_for(lambda: 10 in committed_steps(workdir), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=NO_HANG)
    return workdir, proc.returncode, stderr


def test_sigterm_stops_without_evaluating(stopped_by_sigterm):
    workdir, status, stderr = stopped_by_sigterm
    assert status == 0, stderr[-3000:]
    step = max(committed_steps(workdir))
    assert step > 10 and f"stopped by SIGTERM at step {step} after saving a checkpoint" in stderr
    assert not (workdir / "eval").exists() and not (workdir / "samples").exists()


# --- a corrupt checkpoint -------------------------------------------------------------------


def garble(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def test_corrupt_newest_checkpoint_is_moved_aside_for_eval_and_sample(stopped_by_sigterm, tmp_path):
    shutil.copytree(stopped_by_sigterm[0], tmp_path, dirs_exist_ok=True)
    *_, previous, newest = committed_steps(tmp_path)
    garble(tmp_path / "checkpoints" / str(newest))
    (tmp_path / "checkpoints" / f"{newest}.corrupt").mkdir()  # an earlier one: name taken

    result = run_cli(tmp_path, "--mode=eval")
    assert committed_steps(tmp_path)[-1] == previous
    moved = tmp_path / "checkpoints" / f"{newest}.corrupt.1"
    assert (moved / "state").is_dir()
    warning = [line for line in result.stderr.splitlines() if "unreadable" in line]
    assert len(warning) == 1 and f"moved it to {moved}" in warning[0]
    assert f"step_{previous}.json" in {p.name for p in (tmp_path / "eval").iterdir()}
    assert not (tmp_path / "eval" / f"step_{newest}.json").exists()

    run_cli(tmp_path, "--mode=sample")
    assert (tmp_path / "samples" / f"sample_step_{previous}.png").exists()


# --- what is logged -------------------------------------------------------------------------


def test_metrics_rows_after_the_resumed_step_are_dropped_and_nan_is_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    writer = metrics_io.MetricWriter(tmp_path, tensorboard=False, resume_step=3)
    writer.write(4, {"loss": float("nan"), "grad_norm": float("inf"), "v": [1.0, float("-inf")]})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(lines[-1]) == {"step": 4, "loss": None, "grad_norm": None, "v": [1.0, None]}
    assert not list(tmp_path.glob("*.tmp"))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_counts_only_training_steps():
    clock = FakeClock()
    progress = metrics_io.Progress(total=1000, start=200, unit="steps", clock=clock)
    clock.now += 30.0  # compiling and the first step, which warms up
    progress.begin(201)
    first = progress.update(201)
    assert math.isnan(first["rate"]) and progress.line(201, first).endswith("? steps/s ETA ?")

    clock.now += 10.0  # 20 steps at 2 steps/s
    figures = progress.update(221)
    assert figures["rate"] == pytest.approx(2.0)
    assert figures["eta"] == pytest.approx((1000 - 221) / 2.0)

    clock.now += 5.0  # 10 steps, then a checkpoint and a picture taking 7 s
    with progress.paused():
        clock.now += 7.0
    clock.now += 5.0  # 10 more steps
    figures = progress.update(241)
    assert figures["rate"] == pytest.approx(2.0)
    # The ETA spreads the pauses seen so far over the steps: 27 s for 40 steps.
    assert figures["eta"] == pytest.approx((1000 - 241) * 27.0 / 40)
    assert progress.line(241, figures).startswith("241/1000 (24%) 2.00 steps/s ETA 8m")
