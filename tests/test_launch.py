"""The launchers against fakes of what they drive (tests/fake_bin): launch/tpu_pod.sh against
a fake `gcloud` whose queued resources wait, fail and get preempted and whose TPU workers
are folders on this machine; launch/slurm_gpu.sbatch under a fake `srun` that starts each
task as a local process, where jax.distributed and make_mesh run for real on fake CPU
devices; and every command of launch/README.md. The README's Quick start is what CI runs.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jax._src import clusters

from diffusion_jax import parallel

ROOT = Path(__file__).parents[1]
FAKES = ROOT / "tests" / "fake_bin"
PROBE = FAKES / "probe"
# An override that a shell would change if it parsed it once more than it should.
TRICKY = "--config.training.note=$HOME it's  two  spaces"


@pytest.fixture
def fakes(tmp_path):
    """The environment of a laptop or login node whose gcloud and SLURM are the fakes.
    Afterwards, whatever a failed test left running (detached runs on the fake TPU workers,
    fake SLURM jobs) is killed."""
    home = tmp_path / "home"
    home.mkdir()
    yield {
        **os.environ,
        "PATH": f"{FAKES}:{os.environ['PATH']}",
        "HOME": str(home),
        "TMPDIR": str(tmp_path),
        "FAKE_PYTHON": sys.executable,
        "FAKE_GCLOUD_DIR": str(tmp_path / "gcloud"),
        "FAKE_SLURM_DIR": str(tmp_path / "slurm"),
        "FAKE_VENV_PYTHON": str(PROBE),
        "PROBE_LOG": str(tmp_path / "runs.jsonl"),
        "TPU_POD_POLL_SECONDS": "0",
        "TPU_POD_MAX_WAIT_SECONDS": "30",
        "TPU_LOG_COPY_SECONDS": "1",
        "TPU_STOP_GRACE_SECONDS": "30",
    }
    sessions = [
        int(p.read_text()) for p in tmp_path.glob("gcloud/vm/*/*/diffusion_jax_run/run.pid")
    ]
    sessions += [
        json.loads(p.read_text()).get("session") for p in tmp_path.glob("slurm/*/job.json")
    ]
    for session in filter(None, sessions):
        try:
            os.killpg(session, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bash(args, env, cwd=ROOT, timeout=120):
    return subprocess.run(
        ["bash", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def jsonl(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(condition, what, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- TPU pods -------------------------------------------------------------------------------


class Cloud:
    """The fake gcloud's state and calls (tests/fake_bin/fake_gcloud.py)."""

    def __init__(self, env):
        self.dir = Path(env["FAKE_GCLOUD_DIR"])
        self.env = env

    def set(self, **state):
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state.json").write_text(json.dumps(state))
        (self.dir / "gcs" / "bkt").mkdir(parents=True, exist_ok=True)

    @property
    def state(self):
        return json.loads((self.dir / "state.json").read_text())

    def calls(self, *words):
        """The calls whose argv starts with `words`."""
        calls = jsonl(self.dir / "calls.jsonl")
        return [c for c in calls if c["argv"][: len(words)] == list(words)]

    def verbs(self):
        """Each call as '<group> <verb>' ('queued-resources describe', 'tpu-vm ssh', ...)."""
        return [" ".join(c["argv"][2:4]) for c in self.calls("compute", "tpus")]

    def home(self, node, worker):
        return self.dir / "vm" / node / f"worker-{worker}"

    def runs(self, count):
        """The probe's records once `count` runs have ended (the workers run detached)."""
        log = Path(self.env["PROBE_LOG"])
        wait_until(lambda: len(jsonl(log)) >= count, f"{count} runs")
        return jsonl(log)


def launch_tpu(env, *options, args=("--config=configs/cifar10.py", "--workdir=gs://bkt/c10")):
    return bash(
        [ROOT / "launch" / "tpu_pod.sh", "--name=pod", "--zone=us-east5-a", *options, "--", *args],
        env,
    )


def test_queued_tpu_is_waited_for_then_gets_the_code_and_the_override_verbatim(fakes):
    cloud = Cloud(fakes)
    cloud.set(queue_plan=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    args = ["--config=configs/cifar10.py", "--workdir=gs://bkt/c10", TRICKY]
    out = launch_tpu(fakes, "--type=v5p-16", "--queued", "--spot", args=args)
    assert out.returncode == 0, out.stderr

    [create] = cloud.calls("compute", "tpus", "queued-resources", "create")
    assert create["argv"][4:] == [
        "pod-qr",
        "--zone=us-east5-a",
        "--accelerator-type=v5p-16",
        "--runtime-version=v2-alpha-tpuv5",
        "--node-id=pod",
        "--spot",
    ]
    # Polled through every state; nothing touched a worker before ACTIVE.
    states = [
        c.get("output") for c in cloud.calls("compute", "tpus", "queued-resources", "describe")
    ]
    assert states == [None, "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]
    verbs = cloud.verbs()
    assert (
        verbs[:5]
        == ["queued-resources describe", "queued-resources create"]
        + ["queued-resources describe"] * 3
    )
    assert verbs[5:] == ["tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh"]
    for line in ("queued resource pod-qr: WAITING_FOR_RESOURCES", "queued resource pod-qr: ACTIVE"):
        assert line in out.stdout

    # Both workers of the v5p-16 ran the same command, verbatim, from the shipped tree, with a
    # Python from uv (installed by pip, as on a fresh image), and following worker 0's log
    # showed its run.
    runs = cloud.runs(2)
    assert {r["env"]["FAKE_HOSTNAME"] for r in runs} == {"pod-w-0", "pod-w-1"}
    for run in runs:
        assert run["argv"] == args
        assert run["env"]["DIFFUSION_JAX_DISTRIBUTED"] == "1"
        assert Path(run["cwd"], "diffusion_jax", "parallel.py").exists()
    assert "probe: -m diffusion_jax" in out.stdout and "exit status 0" in out.stdout
    calls = (cloud.home("pod", 1) / "calls.log").read_text()
    assert "python3 -m pip install -q --user uv" in calls
    assert "uv venv -q --python 3.12" in calls and "uv pip install" in calls
    # Each worker looked for processes holding its TPU, and copied its log to the bucket.
    assert f"lsof -t -w {cloud.home('pod', 1)}/dev/accel0" in calls
    for worker in (0, 1):
        log = cloud.dir / "gcs" / "bkt" / "c10" / "logs" / f"pod-w-{worker}.log"
        copied = lambda log=log: log.exists() and "exit status 0" in log.read_text()
        wait_until(copied, "the log in the bucket")
        assert TRICKY in log.read_text()


def test_failed_queued_resource_is_one_line_with_its_reason(fakes):
    cloud = Cloud(fakes)
    reason = "Quota 'TPUV5P_PER_PROJECT_PER_ZONE' exceeded. Limit: 0.0 in zone us-east5-a."
    cloud.set(queue_plan=["WAITING_FOR_RESOURCES", "FAILED"], failure=reason)
    out = launch_tpu(fakes, "--queued")
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: queued resource pod-qr failed: {reason}"
    assert "tpu-vm ssh" not in cloud.verbs() and "tpu-vm scp" not in cloud.verbs()


def test_queued_resource_that_never_comes_stops_at_the_time_limit(fakes):
    cloud = Cloud(fakes)
    cloud.set(queue_plan=["WAITING_FOR_RESOURCES"])
    out = launch_tpu({**fakes, "TPU_POD_MAX_WAIT_SECONDS": "1"}, "--queued")
    assert out.returncode == 1
    assert "still WAITING_FOR_RESOURCES after 1s" in out.stderr


def test_preempted_node_is_deleted_and_created_again(fakes):
    cloud = Cloud(fakes)
    cloud.set(nodes={"pod": {"state": "PREEMPTED", "type": "v5p-16", "has_run": True}})
    out = launch_tpu(fakes, "--type=v5p-16", "--spot")
    assert out.returncode == 0, out.stderr
    assert "TPU pod is PREEMPTED: deleting and creating it again" in out.stdout
    assert cloud.verbs()[:5] == [
        "tpu-vm describe",
        "tpu-vm delete",
        "tpu-vm create",
        "tpu-vm describe",
        "tpu-vm scp",
    ]
    assert len(cloud.runs(2)) == 2


def test_suspended_queued_resource_is_queued_again_and_a_rerun_reuses_a_live_one(fakes):
    cloud = Cloud(fakes)
    qr = {"state": "SUSPENDED", "plan": [], "nodes": ["pod"]}
    cloud.set(queued={"pod-qr": qr}, queue_plan=["PROVISIONING", "ACTIVE"])
    out = launch_tpu(fakes, "--type=v5p-16", "--queued", "--spot")
    assert out.returncode == 0, out.stderr
    [delete] = cloud.calls("compute", "tpus", "queued-resources", "delete")
    assert "--force" in delete["argv"]
    assert len(cloud.calls("compute", "tpus", "queued-resources", "create")) == 1
    cloud.runs(2)

    # The same command again, while worker 0's run is still going and some other process
    # holds its TPU: the request is reused, the run stopped with SIGTERM (it saves), the
    # holder killed, the lock removed; then the run starts anew.
    waiting = {**fakes, "PROBE_WAIT": "1"}
    assert launch_tpu(waiting, "--type=v5p-16", "--queued", "--no-follow").returncode == 0
    holder = subprocess.Popen(["sleep", "300"])
    home = cloud.home("pod", 0)
    (home / "tpu_holders").write_text(f"{holder.pid}\n")
    (home / "tmp" / "libtpu_lockfile").touch()
    out = launch_tpu(fakes, "--type=v5p-16", "--queued")
    assert out.returncode == 0, out.stderr
    assert len(cloud.calls("compute", "tpus", "queued-resources", "create")) == 1
    assert "pod-w-0: stopping the previous run" in out.stdout
    assert f"pod-w-0: killing the processes holding the TPU: {holder.pid}" in out.stdout
    assert holder.wait(timeout=10) == -signal.SIGKILL
    assert not (home / "tmp" / "libtpu_lockfile").exists()
    runs = cloud.runs(6)
    assert sum(r.get("stopped_by") == "SIGTERM" for r in runs) == 2


def test_ref_is_checked_out_on_every_worker_and_a_bad_one_fails(fakes, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README").write_text("x\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    cloud = Cloud(fakes)
    cloud.set()

    out = launch_tpu(fakes, "--type=v5p-16", f"--repo={repo}", "--ref=no-such-branch")
    assert out.returncode != 0
    assert f"error: --ref=no-such-branch is no branch, tag or commit of {repo}" in out.stderr
    assert not cloud.calls()  # refused before any TPU was asked for

    out = launch_tpu(fakes, "--type=v5p-16", f"--repo={repo}", "--ref=main")
    assert out.returncode == 0, out.stderr
    for worker in (0, 1):
        code = cloud.home("pod", worker) / "diffusion_jax"
        checkout = subprocess.run(
            ["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        assert checkout.stdout == head
    assert {r["cwd"] for r in cloud.runs(2)} == {
        str(cloud.home("pod", w) / "diffusion_jax") for w in (0, 1)
    }


def test_multislice_queues_one_request_for_every_slice(fakes):
    cloud = Cloud(fakes)
    cloud.set(queue_plan=["ACTIVE"])
    out = launch_tpu(fakes, "--type=v5p-16", "--queued", "--num-slices=2")
    assert out.returncode == 0, out.stderr
    [create] = cloud.calls("compute", "tpus", "queued-resources", "create")
    assert "--node-prefix=pod" in create["argv"] and "--node-count=2" in create["argv"]
    ssh = [c["argv"][4] for c in cloud.calls("compute", "tpus", "tpu-vm", "ssh")]
    assert ssh == ["pod-0", "pod-1", "pod-0", "pod-1", "pod-0"]  # install, start, follow
    hosts = {r["env"]["FAKE_HOSTNAME"] for r in cloud.runs(4)}
    assert hosts == {"pod-0-w-0", "pod-0-w-1", "pod-1-w-0", "pod-1-w-1"}

    out = launch_tpu(fakes, "--num-slices=2")
    assert out.returncode == 2 and "--num-slices needs --queued" in out.stderr


def test_tpu_dry_run_prints_and_calls_nothing(fakes):
    out = launch_tpu(fakes, "--dry-run", "--queued", "--spot")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("+ gcloud compute tpus queued-resources create pod-qr")
    assert lines[1].startswith("+ gcloud compute tpus tpu-vm scp")
    assert [line.split("<")[-1] for line in lines[2:] if "ssh" in line] == [
        "tpu_worker.sh install>",
        "tpu_worker.sh start>",
        "tpu_worker.sh follow>",
    ]
    assert not Cloud(fakes).calls()


# --- SLURM ----------------------------------------------------------------------------------


def slurm_step_env(nodes, tasks_per_node, rank=0):
    """What srun puts in the environment of one task of a job step."""
    return {
        "SLURM_JOB_ID": "4321",
        "SLURM_STEP_NODELIST": "gpu[017-020]",
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank % tasks_per_node),
    }


def test_one_task_per_node_keeps_every_gpu(monkeypatch):
    env = slurm_step_env(nodes=4, tasks_per_node=1, rank=2)
    for name in list(os.environ):
        if name.startswith(("SLURM_", "JAX_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Left to itself, JAX narrows each process to GPU number SLURM_LOCALID, even with the
    # three arguments given: one GPU per node.
    detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        "gpu017:1234", 4, 2, None, None, 300
    )
    assert detected[3] == [0]
    # Hence its detection is switched off, and the arguments come from SLURM.
    kwargs = parallel.distributed_arguments(None, None, None, env)
    assert kwargs == {
        "coordinator_address": f"gpu017:{parallel.slurm_coordinator_port(4321)}",
        "num_processes": 4,
        "process_id": 2,
        "cluster_detection_method": "deactivate",
    }
    assert "local_device_ids" not in kwargs
    explicit = {**env, "JAX_COORDINATOR_ADDRESS": "gpu017:20000", "JAX_NUM_PROCESSES": "4"}
    assert parallel.distributed_arguments(None, None, None, explicit) == {
        **kwargs,
        "coordinator_address": "gpu017:20000",
    }


@pytest.mark.parametrize(
    "env, expected",
    [
        # One task per GPU: JAX's own choice of one GPU each stands.
        (
            slurm_step_env(nodes=2, tasks_per_node=8, rank=9),
            {"coordinator_address": None, "num_processes": None, "process_id": None},
        ),
        # No SLURM: the explicit arguments as they are.
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1},
        ),
        # A Cloud TPU pod: JAX finds everything.
        (
            {"DIFFUSION_JAX_DISTRIBUTED": "1"},
            {"coordinator_address": None, "num_processes": None, "process_id": None},
        ),
        # One process on one machine, inside a SLURM job or not.
        ({}, None),
        (slurm_step_env(nodes=1, tasks_per_node=1), None),
    ],
)
def test_distributed_arguments(env, expected):
    assert parallel.distributed_arguments(None, None, None, env) == expected


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu[017-020]", "gpu017"), ("a7,b1", "a7"), ("n[3,5-9],m2", "n3"), ("solo", "solo")],
)
def test_slurm_coordinator_is_the_first_node(nodelist, host):
    env = {**slurm_step_env(nodes=2, tasks_per_node=1), "SLURM_STEP_NODELIST": nodelist}
    assert parallel.distributed_arguments(None, None, None, env)["coordinator_address"] == (
        f"{host}:{parallel.slurm_coordinator_port(4321)}"
    )


def free_slurm_job_id():
    """A job id whose coordinator port (parallel.slurm_coordinator_port) is free here."""
    for job_id in range(10_000 + os.getpid() % 10_000, 40_000):
        with socket.socket() as s:
            try:
                s.bind(("", parallel.slurm_coordinator_port(job_id)))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port")


def test_slurm_job_of_two_nodes_with_four_gpus_each(fakes, tmp_path):
    """The batch script under a fake srun, in the environment SLURM gives a 2-node x 4-GPU
    job: each task joins through initialize_distributed with its node's 4 devices."""
    job_id = free_slurm_job_id()
    env = {
        **fakes,
        "PYTHON": str(PROBE),
        "PROBE_JAX": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
    }
    args = ["--config=configs/imagenet64.py", "--workdir=/shared/in64", "--config.mesh.fsdp=4"]
    out = bash([ROOT / "launch" / "slurm_gpu.sbatch", *args], env)
    assert out.returncode == 0, out.stdout + out.stderr

    [srun] = [
        c["argv"] for c in jsonl(tmp_path / "slurm" / "calls.jsonl") if c["command"] == "srun"
    ]
    assert srun[:4] == [
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--kill-on-bad-exit=1",
    ]
    tasks = sorted(jsonl(env["PROBE_LOG"]), key=lambda r: r["process_index"])
    assert [t["process_index"] for t in tasks] == [0, 1]
    for task in tasks:
        assert task["argv"] == args
        assert task["env"]["JAX_COORDINATOR_ADDRESS"] == f"127.0.0.1:{10_000 + job_id % 20_000}"
        assert task["kwargs"]["cluster_detection_method"] == "deactivate"
        assert task["cuda_visible_devices"] == "all"  # not "0": every GPU of the node
        assert (task["process_count"], task["local_devices"], task["global_devices"]) == (2, 4, 8)
        assert task["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
        # 'fsdp' inside a node: each data row of the mesh is one process's devices.
        assert task["owners"] == [[[0]] * 4, [[1]] * 4]


def test_slurm_dry_run(fakes):
    env = {**fakes, "NNODES": "4", "HEAD_NODE": "gpu001", "SLURM_JOB_ID": "77"}
    out = bash([ROOT / "launch" / "slurm_gpu.sbatch", "--dry-run", "--config=c.py", TRICKY], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "+ JAX_COORDINATOR_ADDRESS=gpu001:10077 JAX_NUM_PROCESSES=4 srun --nodes=4 "
        "--ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 python3 -m diffusion_jax"
    )


# --- launch/README.md -----------------------------------------------------------------------


def readme_sections():
    """{heading: its ```sh blocks joined} for each section of launch/README.md with any."""
    text = (ROOT / "launch" / "README.md").read_text()
    sections = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        blocks = re.findall(r"^```sh\n(.*?)^```", body, flags=re.M | re.S)
        if blocks:
            sections[heading] = "\n".join(blocks)
    return sections


def run_readme(key, env, cwd):
    """The commands of the section whose heading has `key`, as one shell session, in a
    folder that has the checkout's launch/ and configs/ (a SLURM job writes its log where
    it is submitted)."""
    [commands] = [c for heading, c in readme_sections().items() if key in heading]
    for name in ("launch", "configs"):
        if not (cwd / name).exists():
            (cwd / name).symlink_to(ROOT / name)
    out = bash(["-c", f"set -euo pipefail\n{commands}"], env, cwd=cwd, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def readme_rehearsal(env, tmp_path):
    out = run_readme("rehearsal", {**env, "PYTHON": str(PROBE)}, tmp_path)
    runs = jsonl(env["PROBE_LOG"])
    assert sorted(r["env"]["JAX_PROCESS_ID"] for r in runs) == ["0", "1"]
    assert "[p0] probe: -m diffusion_jax" in out.stdout


def readme_tpu(env, tmp_path):
    """Queued, run, preempted (the fake suspends the slice after its first run), the same
    command again: a new request, and the run on it."""
    cloud = Cloud(env)
    cloud.dir.mkdir(parents=True)
    (cloud.dir / "state.json").write_text(json.dumps({"preempt_after_run": True}))
    out = run_readme("v5p", env, tmp_path)
    assert "SUSPENDED" in out.stdout.splitlines()
    assert "queued resource c10-qr is SUSPENDED: deleting it and queueing it again" in out.stdout
    creates = cloud.calls("compute", "tpus", "queued-resources", "create")
    assert len(creates) == 2 and "--accelerator-type=v5p-32" in creates[0]["argv"]
    assert len(cloud.runs(8)) == 8  # four workers, twice
    assert not cloud.state["queued"]  # cleaned up
    bucket = next((cloud.dir / "gcs").iterdir())
    assert len(list((bucket / "runs" / "c10" / "logs").iterdir())) == 4
    assert (cloud.dir / "tfds.log").read_text().startswith("tfds build cifar10 --data_dir=gs://")


def readme_slurm(env, tmp_path):
    """Submitted, stopped near its time limit (USR1): saved, requeued and resumed by itself,
    then cancelled; 4 nodes x 8 devices with --config.mesh.fsdp=8, through jax.distributed."""
    env = {
        **env,
        "FAKE_SLURM_JOB_ID": str(free_slurm_job_id()),
        "PROBE_JAX": "1",
        "PROBE_WAIT": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    run_readme("SLURM", env, tmp_path)
    slurm = Path(env["FAKE_SLURM_DIR"])
    job = slurm / f"job-{env['FAKE_SLURM_JOB_ID']}" / "job.json"
    wait_until(lambda: json.loads(job.read_text())["state"] == "CANCELLED", "the job's end")
    requeues = [c for c in jsonl(slurm / "calls.jsonl") if c["argv"][:1] == ["requeue"]]
    assert len(requeues) == 1
    runs = jsonl(env["PROBE_LOG"])
    assert sorted(r["env"]["SLURM_RESTART_COUNT"] for r in runs) == ["0"] * 4 + ["1"] * 4
    port = parallel.slurm_coordinator_port(int(env["FAKE_SLURM_JOB_ID"]))
    for run in runs:
        assert run["env"]["JAX_COORDINATOR_ADDRESS"] == f"127.0.0.1:{port}"
        assert run["stopped_by"].startswith("SIGTERM")
        assert (run["process_count"], run["local_devices"], run["global_devices"]) == (4, 8, 32)
        assert run["mesh"] == {"data": 4, "fsdp": 8, "tensor": 1}
        assert run["cuda_visible_devices"] == "all"
    log = next(tmp_path.glob("diffusion-jax-*.log")).read_text()
    assert "requeueing job" in log and "restart 1" in log


README_RUNS = {
    "rehearsal": readme_rehearsal,
    "v5p": readme_tpu,
    "SLURM": readme_slurm,
}


@pytest.mark.parametrize("part", README_RUNS)
def test_launch_readme_commands_run_against_the_fakes(part, fakes, tmp_path):
    README_RUNS[part](fakes, tmp_path)


def test_every_launch_readme_section_with_commands_is_run():
    for heading in readme_sections():
        assert sum(key in heading for key in README_RUNS) == 1, heading


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```sh\n(.*?)```", readme, re.S).group(1)
    commands = block.strip().splitlines()
    assert len(commands) == 2
    assert "diffusion-jax --config=configs/digits.py" in commands[0]
    assert "pip install -e '.[test]'" in commands[1] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and "ruff check" in ci and "ruff format --check" in ci
