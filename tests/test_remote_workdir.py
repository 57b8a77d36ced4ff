"""A gs:// workdir end to end, against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py):
train, resume, SIGKILL and resume, eval and sample from the bucket, two processes sharing
it, a missing bucket in one line, nothing written in the current directory. And two
processes given folders that are not the same one: refused in one line."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_COMPILE
from test_cli import run_cli
from test_multihost import free_port

ROOT = Path(__file__).parents[1]
BUCKET = "bkt"
SMOKE = [
    f"--config={ROOT}/configs/digits.py:smoke",
    "--config.training.sample_every=100000",
]


@pytest.fixture(scope="module")
def gcs():
    """The environment of a process that reads and writes the emulated bucket."""
    port = free_port()
    emulator = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), BUCKET],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert emulator.stdout.readline().strip() == "ready"
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath) and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays
        "EPATH_USE_TF": "false",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": FAST_COMPILE,
        "PYTHONPATH": str(ROOT),
    }
    yield env
    emulator.kill()
    emulator.wait()


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    """The current directory of every command: it must stay empty."""
    return tmp_path_factory.mktemp("cwd")


def cli(env, cwd, *args):
    return run_cli(*args, cwd=cwd, env=env, timeout=300)


def bucket(env):
    """Reads the emulated bucket in a fresh process, as another machine would:
    {relative name: bytes} of every object under gs://bkt/<prefix>."""

    def read(prefix: str) -> dict[str, bytes]:
        code = (
            "import json, sys\n"
            "from diffusion_jax import paths\n"
            f"root = paths.path('gs://{BUCKET}/{prefix}')\n"
            "out = {}\n"
            "if root.exists():\n"
            "    for p in paths.files_under(root):\n"
            "        rel = str(p)[len(str(root)) + 1:]\n"
            "        out[rel] = p.read_bytes().hex() if '/checkpoints/' not in '/' + rel else ''\n"
            "print(json.dumps(out))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return {k: bytes.fromhex(v) for k, v in json.loads(result.stdout).items()}

    return read


def tensorboard_tags(objects) -> set[tuple[str, str]]:
    """{(kind, tag)} of the summaries in every TensorBoard event file among `objects`: each
    file is TFRecords (length, its CRC, an Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2

    found = set()
    for name, data in objects.items():
        if not name.startswith("tensorboard/events.out.tfevents"):
            continue
        at = 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.add(("image" if value.HasField("image") else "scalar", value.tag))
    return found


def metric_steps(objects) -> list[int]:
    return [json.loads(line)["step"] for line in objects["metrics.jsonl"].decode().splitlines()]


def checkpoint_steps(objects, folder="checkpoints") -> set[int]:
    """The committed steps: a bucket has no rename, so orbax marks a finished step with
    <step>/commit_success.txt, and a step without it (a kill mid-save) does not count."""
    return {
        int(parts[1])
        for parts in (name.split("/") for name in objects)
        if parts[0] == folder and parts[1].isdigit() and parts[2:] == ["commit_success.txt"]
    }


def test_train_resume_kill_eval_and_sample_in_a_bucket(gcs, cwd):
    read = bucket(gcs)
    workdir = f"gs://{BUCKET}/runs/digits"

    first = cli(gcs, cwd, f"--workdir={workdir}", *SMOKE)
    assert first.returncode == 0, first.stderr[-3000:]
    objects = read("runs/digits")
    assert json.loads(objects["config.json"])["training"]["num_steps"] == 2
    assert metric_steps(objects) == [1, 2]
    assert checkpoint_steps(objects) == {1, 2}
    assert json.loads(objects["eval/step_2.json"])["step"] == 2
    # TensorBoard in the bucket: the training curves, the last sample grid, the evaluation.
    tags = tensorboard_tags(objects)
    assert {("scalar", "loss"), ("image", "samples"), ("scalar", "eval/digits_fd")} <= tags, tags
    assert "commit_success.txt" in {n.rsplit("/", 1)[-1] for n in objects}  # orbax's GCS commit

    # SIGKILL in the middle of a long run; the same command resumes from the bucket.
    long_run = [*SMOKE, "--config.training.num_steps=400", "--config.training.eval_at_end=False"]
    killed = subprocess.Popen(
        [sys.executable, "-m", "diffusion_jax", f"--workdir={workdir}", *long_run],
        cwd=cwd,
        env=gcs,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    seen = ""
    while time.monotonic() < deadline and "step 12/400" not in seen:
        seen += killed.stderr.readline()
    assert "step 12/400" in seen, seen[-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    before = checkpoint_steps(read("runs/digits"))
    assert max(before) >= 8

    resumed = cli(gcs, cwd, f"--workdir={workdir}", *SMOKE, "--config.training.num_steps=20")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"steps {max(before)} -> 20" in resumed.stderr
    objects = read("runs/digits")
    assert metric_steps(objects) == list(range(1, 21))  # each step once, in order
    assert 20 in checkpoint_steps(objects)

    # Eval at other settings and sample, from the bucket.
    scored = cli(gcs, cwd, f"--workdir={workdir}", *SMOKE, "--mode=eval",
                 "--config.sampling.num_steps=3", "--config.training.num_steps=20")  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    sampled = cli(gcs, cwd, f"--workdir={workdir}", *SMOKE, "--mode=sample",
                  "--config.training.num_steps=20")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    objects = read("runs/digits")
    new_results = [n for n in objects if n.startswith("eval/step_20")]
    assert len(new_results) == 2, sorted(objects)  # at the run's settings, and at 3 steps
    assert objects["samples/sample_step_20.png"].startswith(b"\x89PNG")
    assert json.loads(objects["samples/sample_step_20.json"])["step"] == 20

    # Export to the bucket, then score the exported file from another bucket workdir: the
    # file is read from a local copy, fetched into the cache.
    cache = cwd.parent / "cache"
    env = {**gcs, "DIFFUSION_JAX_CACHE": str(cache)}
    exported = cli(env, cwd, f"--workdir={workdir}", *SMOKE, "--mode=export",
                   "--config.training.num_steps=20")  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    params_file = f"{workdir}/export/ema_step_20.msgpack"
    from_file = cli(env, cwd, f"--workdir=gs://{BUCKET}/runs/from_file", *SMOKE, "--mode=eval",
                    f"--config.eval.params_file={params_file}")  # fmt: skip
    assert from_file.returncode == 0, from_file.stderr[-3000:]
    assert f"config.eval.params_file={params_file}: read from its local copy" in from_file.stderr
    scored_file = json.loads(read("runs/from_file")["eval/file_ema_step_20.json"])
    assert scored_file["digits_fd"] == json.loads(objects["eval/step_20.json"])["digits_fd"]
    assert sorted(p.name for p in cache.rglob("*.msgpack")) == ["ema_step_20.msgpack"]

    assert list(cwd.iterdir()) == []  # nothing landed in the current directory


def test_a_copy_is_fetched_again_when_its_object_changes(gcs, tmp_path):
    code = (
        "import sys\n"
        "from diffusion_jax import paths\n"
        f"obj = 'gs://{BUCKET}/weights/w.bin'\n"
        "paths.write_bytes(obj, b'first')\n"
        "copy = paths.local(obj)\n"
        "assert copy.read_bytes() == b'first', copy.read_bytes()\n"
        "assert paths.local(obj) == copy\n"
        "paths.write_bytes(obj, b'other')  # the same size: only its time tells\n"
        "assert paths.local(obj).read_bytes() == b'other'\n"
        "try:\n"
        "    paths.path('gcs://b/x')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    env = {**gcs, "DIFFUSION_JAX_CACHE": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ConfigError gcs://b/x: gcs:// is not a store this reads")
    assert not [p for p in tmp_path.rglob("*") if ".part-" in p.name]


def test_a_missing_bucket_is_one_line(gcs, cwd):
    result = cli(gcs, cwd, "--workdir=gs://no-such-bucket/run", *SMOKE)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --workdir=gs://no-such-bucket/run: cannot write in it")
    assert "no-such-bucket" in lines[-1]
    assert list(cwd.iterdir()) == []


def two_processes(env, cwd, workdirs, *extra):
    """Process i of 2 (4 fake devices each) with --workdir=workdirs[i]; their results."""
    port = free_port()
    procs = []
    for i, workdir in enumerate(workdirs):
        penv = {
            **env,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "diffusion_jax", f"--workdir={workdir}", *SMOKE, *extra],
                cwd=cwd,
                env=penv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return [(p.wait(timeout=400), p.stderr.read()) for p in procs]


def test_two_processes_share_the_bucket(gcs, cwd):
    workdir = f"gs://{BUCKET}/runs/two"
    results = two_processes(
        gcs, cwd, [workdir, workdir], "--config.mesh.fsdp=2", "--config.training.num_steps=3"
    )
    for rc, err in results:
        assert rc == 0, err[-3000:]
    objects = bucket(gcs)("runs/two")
    assert metric_steps(objects) == [1, 2, 3]
    assert checkpoint_steps(objects) >= {2, 3}
    # Both processes wrote their shards of the one checkpoint.
    shards = {n.split("/")[3] for n in objects if n.startswith("checkpoints/3/state/ocdbt")}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= shards, sorted(shards)
    assert list(cwd.iterdir()) == []


def test_processes_that_do_not_share_their_workdir_are_refused(gcs, tmp_path):
    """Two hosts, each with a local folder of its own: simulated with two folders."""
    a, b = tmp_path / "host0" / "run", tmp_path / "host1" / "run"
    results = two_processes(gcs, tmp_path, [a, b])
    for rc, err in results:
        assert rc == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: --workdir="), last
        assert "process(es) [1] of 2 do not see the files process 0 writes there" in last
    assert not (b / "checkpoints").exists() and not (a / "checkpoints").exists()
