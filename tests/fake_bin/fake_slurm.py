"""A SLURM cluster on one machine, for tests/test_launch.py: `srun`, `sbatch`, `scontrol`,
`scancel`, `squeue` and `sacct` (the bash files next to this one call it).

Nodes are loopback addresses (127.0.0.1, 127.0.0.2, ...), so a coordinator on "node 1"
is reachable. State lives in $FAKE_SLURM_DIR: calls.jsonl (every call, with its argv) and
job-<id>/job.json per job. `sbatch` runs the batch script in the background with the
environment SLURM gives it, again after `scontrol requeue`; `srun` starts every task of a
step as a local process and passes SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 on to them.
Each task is given $FAKE_TASK_READY, a file to create once it runs (a training run would
be stepping); `scancel` waits for every task of a run it has not signalled yet, then
signals like SLURM: the batch shell only with --batch, the tasks only with --signal, and
both (SIGTERM) without.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake_slurm"))
WAIT_SECONDS = 120


def record(command: str, argv: list[str]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "calls.jsonl", "a") as f:
        f.write(json.dumps({"command": command, "argv": argv}) + "\n")


def split_options(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading `--name=value` / `--flag` options, then the rest (the command or script)."""
    options = {}
    while argv and argv[0].startswith("-"):
        name, _, value = argv.pop(0).lstrip("-").partition("=")
        options[name] = value
    return options, argv


def expand_hostnames(nodelist: str) -> list[str]:
    """'127.0.0.[1-3]' -> ['127.0.0.1', '127.0.0.2', '127.0.0.3']; 'a,b' -> ['a', 'b']."""
    if "[" not in nodelist:
        return nodelist.split(",")
    prefix, _, ranges = nodelist.partition("[")
    hosts = []
    for part in ranges.rstrip("]").split(","):
        first, _, last = part.partition("-")
        hosts += [f"{prefix}{i}" for i in range(int(first), int(last or first) + 1)]
    return hosts


def nodelist(nodes: int) -> str:
    return "127.0.0.1" if nodes == 1 else f"127.0.0.[1-{nodes}]"


def job_dir(job_id: str) -> Path:
    return STATE / f"job-{job_id}"


def load(job_id: str) -> dict:
    return json.loads((job_dir(job_id) / "job.json").read_text())


def save(job: dict) -> None:
    path = job_dir(job["id"]) / "job.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job))
    tmp.replace(path)


def srun(argv: list[str]) -> int:
    record("srun", argv)
    options, command = split_options(list(argv))
    nodes = int(options.get("nodes", os.environ.get("SLURM_JOB_NUM_NODES", "1")))
    per_node = int(options.get("ntasks-per-node", "1"))
    ntasks = nodes * per_node
    job_id = os.environ["SLURM_JOB_ID"]
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    hosts = expand_hostnames(os.environ.get("SLURM_JOB_NODELIST", nodelist(nodes)))
    job_dir(job_id).mkdir(parents=True, exist_ok=True)
    tasks = []
    for rank in range(ntasks):
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank % per_node),
            "SLURM_NODEID": str(rank // per_node),
            "SLURMD_NODENAME": hosts[rank // per_node],
            "SLURM_NTASKS": str(ntasks),
            "SLURM_STEP_ID": "0",
            "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            "SLURM_STEP_NODELIST": os.environ.get("SLURM_JOB_NODELIST", nodelist(nodes)),
            # Slurm >= 22.05: a step has one CPU per task unless srun is told otherwise.
            "SLURM_CPUS_PER_TASK": options.get("cpus-per-task", "1"),
            "FAKE_TASK_READY": str(job_dir(job_id) / f"ready-{restart}-{rank}"),
        }
        tasks.append(subprocess.Popen(command, env=env))
    (job_dir(job_id) / "srun.pid").write_text(str(os.getpid()))

    def forward(signum, frame):
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    kill_on_bad_exit = options.get("kill-on-bad-exit", "0") != "0"
    while any(task.poll() is None for task in tasks):
        if kill_on_bad_exit and any(task.poll() for task in tasks):
            for task in tasks:
                if task.poll() is None:
                    task.kill()
        time.sleep(0.05)
    return max(abs(task.returncode) for task in tasks)


def scontrol(argv: list[str]) -> int:
    record("scontrol", argv)
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(expand_hostnames(argv[2] if len(argv) > 2 else "127.0.0.1")))
    elif argv[0] == "requeue":
        job = load(argv[1])
        job["requeue"] = True
        save(job)
    else:
        print(f"fake scontrol: {argv} is not faked", file=sys.stderr)
        return 1
    return 0


def sbatch_directives(script: Path) -> dict[str, str]:
    directives = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.split()[1].lstrip("-").partition("=")
            directives[name] = value
    return directives


def sbatch(argv: list[str]) -> int:
    record("sbatch", argv)
    options, rest = split_options(list(argv))
    script, args = Path(rest[0]), rest[1:]
    options = {**sbatch_directives(script), **options}
    job_id = os.environ.get("FAKE_SLURM_JOB_ID") or str(1000 + len(list(STATE.glob("job-*"))))
    job = {
        "id": job_id,
        "name": options.get("job-name", script.name),
        "nodes": int(options.get("nodes", "1")),
        "ntasks_per_node": int(options.get("ntasks-per-node", "1")),
        "cpus_per_task": options.get("cpus-per-task", "1"),
        "gpus_per_node": options.get("gpus-per-node", "0"),
        "script": str(script.resolve()),
        "args": args,
        "cwd": os.getcwd(),
        "output": str(Path(options.get("output", "slurm-%j.out").replace("%j", job_id)).resolve()),
        "state": "PENDING",
        "restarts": 0,
        "requeue": False,
        "cancelled": False,
        "signalled": [],
    }
    save(job)
    subprocess.Popen(
        [sys.executable, __file__, "_batch", job_id],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(job_id if "parsable" in options else f"Submitted batch job {job_id}")
    return 0


def run_batch(job_id: str) -> int:
    """The job's life: the batch script, again after each `scontrol requeue`."""
    while True:
        job = load(job_id)
        nodes = job["nodes"]
        env = {
            **os.environ,
            "SLURM_JOB_ID": job_id,
            "SLURM_JOB_NAME": job["name"],
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": nodelist(nodes),
            "SLURM_NTASKS": str(nodes * job["ntasks_per_node"]),
            "SLURM_NTASKS_PER_NODE": str(job["ntasks_per_node"]),
            "SLURM_CPUS_PER_TASK": job["cpus_per_task"],
            "SLURM_GPUS_ON_NODE": job["gpus_per_node"],
            "SLURM_RESTART_COUNT": str(job["restarts"]),
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
        }
        with open(job["output"], "a") as out:
            batch = subprocess.Popen(
                ["bash", job["script"], *job["args"]],
                env=env,
                cwd=job["cwd"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            job.update(state="RUNNING", batch_pid=batch.pid, session=os.getpid())
            save(job)
            status = batch.wait()
        job = load(job_id)
        if job["requeue"] and not job["cancelled"]:
            job.update(requeue=False, restarts=job["restarts"] + 1, state="PENDING")
            save(job)
            continue
        state = "CANCELLED" if job["cancelled"] else "COMPLETED" if status == 0 else "FAILED"
        job.update(state=state, exit_code=status)
        save(job)
        return status


def wait_for_unsignalled_run(job_id: str) -> dict:
    """The job once every task of a run that no scancel has signalled yet is running."""
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        job = load(job_id)
        run = job["restarts"]
        ntasks = job["nodes"] * job["ntasks_per_node"]
        ready = all((job_dir(job_id) / f"ready-{run}-{i}").exists() for i in range(ntasks))
        if job["state"] == "RUNNING" and run not in job["signalled"] and ready:
            return job
        time.sleep(0.05)
    raise SystemExit(f"fake scancel: job {job_id} has no running tasks to signal")


def scancel(argv: list[str]) -> int:
    record("scancel", argv)
    options, rest = split_options(list(argv))
    job = wait_for_unsignalled_run(rest[0])
    job["signalled"].append(job["restarts"])
    if "signal" not in options:
        job["cancelled"] = True
    save(job)
    signum = getattr(signal, "SIG" + options.get("signal", "TERM").removeprefix("SIG"))
    srun_pid = int((job_dir(job["id"]) / "srun.pid").read_text())
    if "signal" not in options or "batch" in options:
        os.kill(job["batch_pid"], signum)
    if "signal" not in options or "batch" not in options:
        os.kill(srun_pid, signum)
    return 0


def squeue(argv: list[str]) -> int:
    record("squeue", argv)
    print(f"{'JOBID':>8} {'NAME':<16} {'STATE':<10} {'NODES':>5} RESTARTS")
    for path in sorted(STATE.glob("job-*/job.json")):
        job = json.loads(path.read_text())
        if job["state"] in ("PENDING", "RUNNING"):
            print(
                f"{job['id']:>8} {job['name']:<16} {job['state']:<10} "
                f"{job['nodes']:>5} {job['restarts']}"
            )
    return 0


def sacct(argv: list[str]) -> int:
    record("sacct", argv)
    job = load(argv[argv.index("-j") + 1])
    print(f"{'JobID':>8} {'State':<10} Restarts")
    print(f"{job['id']:>8} {job['state']:<10} {job['restarts']}")
    return 0


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "_batch":
        return run_batch(args[0])
    return {
        "srun": srun,
        "sbatch": sbatch,
        "scontrol": scontrol,
        "scancel": scancel,
        "squeue": squeue,
        "sacct": sacct,
    }[command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
