"""A Cloud TPU project on one machine, for tests/test_launch.py: the `gcloud` commands that
launch/tpu_pod.sh and launch/README.md use (the bash file `gcloud` next to this one calls it).

State lives in $FAKE_GCLOUD_DIR: state.json (TPU nodes and queued resources), calls.jsonl
(every call: its argv, what it printed and its exit status), vm/<node>/worker-<i>/ (each
worker's home directory, gone with its node) and gcs/<bucket>/... (Cloud Storage).

- A queued resource walks through the states in state.json's "queue_plan" (default
  WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE), one step each time it is described; its
  nodes exist, READY, from ACTIVE on. A plan that ends in FAILED gives "failure" as reason.
- With "preempt_after_run" set, the next describe of a queued resource after a run has
  been started on its slice finds it SUSPENDED, its nodes gone: the slice was preempted.
- `tpu-vm ssh --command` runs the command with bash in each worker's home directory, with
  tests/fake_bin/worker (sudo, lsof, python3, hostname, gcloud) first on PATH, and the TPU's
  device files and libtpu's lock file in that directory (dev/accel*, tmp/). It refuses a
  node that does not exist or is not READY.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
STATE_DIR = Path(os.environ.get("FAKE_GCLOUD_DIR", "/tmp/fake_gcloud"))
STATE = STATE_DIR / "state.json"
DEFAULT_PLAN = ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]


class Error(Exception):
    """A gcloud error: one line on stderr, exit status 1."""


def load() -> dict:
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    state.setdefault("nodes", {})
    state.setdefault("queued", {})
    return state


def save(state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state, indent=1))


def parse(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional words and `--name=value` / `--flag` options."""
    words, options = [], {}
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            options[name] = value
        else:
            words.append(arg)
    return words, options


def workers(accelerator_type: str) -> int:
    """Hosts of a slice: four chips each ('v5p-32' is 16 chips, two cores per chip)."""
    generation, _, size = accelerator_type.rpartition("-")
    chips = int(size) // 2 if generation in ("v4", "v5p") else int(size)
    return max(1, chips // 4)


def vm_dir(node: str) -> Path:
    return STATE_DIR / "vm" / node


def make_node(state: dict, name: str, options: dict) -> None:
    state["nodes"][name] = {
        "state": "READY",
        "type": options.get("accelerator-type", "v5p-8"),
        "version": options.get("version") or options.get("runtime-version"),
        "spot": "spot" in options,
        "has_run": False,
    }
    for i in range(workers(state["nodes"][name]["type"])):
        home = vm_dir(name) / f"worker-{i}"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        (home / "dev").mkdir()
        for chip in range(4):
            (home / "dev" / f"accel{chip}").touch()


def drop_node(state: dict, name: str) -> None:
    state["nodes"].pop(name, None)
    shutil.rmtree(vm_dir(name), ignore_errors=True)


def not_found(kind: str, name: str) -> Error:
    return Error(f"NOT_FOUND: Resource '{kind}/{name}' was not found")


def queued_resources(verb: str, words: list[str], options: dict) -> str:
    state = load()
    name = words[0] if words else ""
    qr = state["queued"].get(name)
    if verb == "create":
        if qr is not None:
            raise Error(f"ALREADY_EXISTS: queued resource {name} already exists")
        if "node-id" in options:
            nodes = [options["node-id"]]
        else:
            nodes = [f"{options['node-prefix']}-{i}" for i in range(int(options["node-count"]))]
        plan = list(state.get("queue_plan", DEFAULT_PLAN))
        state["queued"][name] = {"state": plan.pop(0), "plan": plan, "nodes": nodes, **options}
        save(state)
        return f"Create request issued for: [{name}]"
    if qr is None:
        raise not_found("queuedResources", name)
    if verb == "describe":
        fmt = options.get("format", "")
        if fmt == "value(state.failedData.error.message)":
            return state.get("failure", "") if qr["state"] == "FAILED" else ""
        assert fmt == "value(state.state)", fmt
        if state.get("preempt_after_run") and any(
            state["nodes"].get(n, {}).get("has_run") for n in qr["nodes"]
        ):
            state["preempt_after_run"] = False
            qr.update(state="SUSPENDED", plan=[])
            for node in qr["nodes"]:
                drop_node(state, node)
        shown = qr["state"]
        if qr["plan"]:
            qr["state"] = qr["plan"].pop(0)
        if qr["state"] == "ACTIVE":
            for node in qr["nodes"]:
                if node not in state["nodes"]:
                    make_node(state, node, qr)
        save(state)
        return shown
    if verb == "delete":
        if qr["state"] == "ACTIVE" and "force" not in options:
            raise Error(f"queued resource {name} has nodes; delete them first or use --force")
        for node in qr["nodes"]:
            drop_node(state, node)
        del state["queued"][name]
        save(state)
        return f"Deleted queued resource [{name}]."
    raise Error(f"fake gcloud: queued-resources {verb} is not faked")


def run_on_workers(name: str, worker: str, command: str) -> int:
    state = load()
    node = state["nodes"].get(name)
    if node is None or node["state"] != "READY":
        raise Error(f"TPU {name} is {node and node['state'] or 'missing'}: cannot ssh")
    homes = sorted(vm_dir(name).glob("worker-*"), key=lambda p: int(p.name.split("-")[1]))
    if worker != "all":
        homes = [homes[int(worker)]]
    # A fresh worker has no uv: the fake one is not on its PATH until pip installs it.
    path = [HERE / "worker"] + [p for p in os.environ["PATH"].split(":") if Path(p) != HERE]
    status = 0
    for home in homes:
        env = {
            **os.environ,
            "HOME": str(home),
            "PATH": ":".join(map(str, path)),
            "FAKE_HOSTNAME": f"{name}-w-{home.name.split('-')[1]}",
            "TPU_DEVICE_FILES": f"{home}/dev/accel*",
            "LIBTPU_LOCKFILE": f"{home}/tmp/libtpu_lockfile",
        }
        result = subprocess.run(["bash", "-c", command], cwd=home, env=env)
        status = status or result.returncode
    if "start" in command.split()[-1:]:
        state = load()
        state["nodes"][name]["has_run"] = True
        save(state)
    return status


def tpu_vm(verb: str, words: list[str], options: dict) -> str | int:
    state = load()
    if verb == "create":
        if words[0] in state["nodes"]:
            raise Error(f"ALREADY_EXISTS: TPU {words[0]} already exists")
        make_node(state, words[0], options)
        save(state)
        return f"Created tpu [{words[0]}]."
    if verb == "scp":
        source, target = words
        name, _, path = target.partition(":")
        if state["nodes"].get(name, {}).get("state") != "READY":
            raise Error(f"TPU {name} is not READY: cannot scp")
        for home in vm_dir(name).glob("worker-*"):
            shutil.copy(source, home / path)
        return ""
    if verb == "ssh":
        return run_on_workers(words[0], options.get("worker", "0"), options["command"])
    node = state["nodes"].get(words[0])
    if node is None:
        raise not_found("nodes", words[0])
    if verb == "describe":
        assert options.get("format") == "value(state)", options
        return node["state"]
    if verb == "delete":
        drop_node(state, words[0])
        save(state)
        return f"Deleted tpu [{words[0]}]."
    raise Error(f"fake gcloud: tpu-vm {verb} is not faked")


def bucket_path(url: str) -> Path:
    assert url.startswith("gs://"), url
    return STATE_DIR / "gcs" / url.removeprefix("gs://")


def storage(words: list[str], options: dict) -> str:
    verb, rest = words[0], words[1:]
    if verb == "buckets" and rest[0] == "create":
        bucket_path(rest[1]).mkdir(parents=True, exist_ok=True)
        return f"Creating {rest[1]}/..."
    if verb == "cp":
        source, target = rest
        bucket = target.removeprefix("gs://").split("/")[0]
        if not (STATE_DIR / "gcs" / bucket).is_dir():
            raise Error(f"NOT_FOUND: bucket gs://{bucket} does not exist")
        bucket_path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, bucket_path(target))
        return ""
    if verb == "ls":
        folder = bucket_path(rest[0])
        if not folder.exists():
            raise Error(f"One or more URLs matched no objects: {rest[0]}")
        return "\n".join(f"{rest[0].rstrip('/')}/{p.name}" for p in sorted(folder.iterdir()))
    if verb == "cat":
        return bucket_path(rest[0]).read_text().rstrip("\n")
    raise Error(f"fake gcloud: storage {verb} is not faked")


def gcloud(argv: list[str]) -> str | int:
    words, options = parse(argv)
    if words[:3] == ["compute", "tpus", "queued-resources"]:
        return queued_resources(words[3], words[4:], options)
    if words[:3] == ["compute", "tpus", "tpu-vm"]:
        return tpu_vm(words[3], words[4:], options)
    if words[:1] == ["storage"]:
        return storage(words[1:], options)
    raise Error(f"fake gcloud: {' '.join(words)} is not faked")


def main(argv: list[str]) -> int:
    call = {"argv": argv}
    try:
        result = gcloud(argv)
        status = result if isinstance(result, int) else 0
        if isinstance(result, str):
            call["output"] = result
            if result:
                print(result)
    except Error as error:
        status = 1
        call["error"] = str(error)
        print(f"ERROR: (gcloud) {error}", file=sys.stderr)
    call["status"] = status
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "calls.jsonl", "a") as f:
        f.write(json.dumps(call) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
