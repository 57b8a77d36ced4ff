"""`python -m diffusion_jax ...` as a launcher starts it, for tests/test_launch.py: appends
one JSON line to $PROBE_LOG with its argv, working directory and environment (SLURM_*,
JAX_*, DIFFUSION_JAX_*, the fake TPU worker's name).

PROBE_JAX=1: first joins the job through diffusion_jax.parallel.initialize_distributed and
adds the arguments JAX got, the devices it sees and the mesh make_mesh builds for the
--config.mesh.* overrides. PROBE_WAIT=1: then behaves like a training run, up until SIGTERM
(which it records; with PROBE_JAX, through JAX's preemption service at a step all
processes agree on) and exiting 0; $FAKE_TASK_READY, when set, is created once it is up.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

stopped = []
signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append("SIGTERM"))

argv = sys.argv[1:]
assert argv[:2] == ["-m", "diffusion_jax"], argv
record = {
    "argv": argv[2:],
    "cwd": os.getcwd(),
    "env": {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("SLURM_", "JAX_", "DIFFUSION_JAX_")) or k == "FAKE_HOSTNAME"
    },
}
if os.environ.get("PROBE_JAX") == "1":
    import jax
    from jax._src import xla_bridge

    from diffusion_jax import config as config_lib
    from diffusion_jax import parallel

    parallel.initialize_distributed()
    config = config_lib.base_config()
    for arg in argv:
        if arg.startswith("--config.mesh."):
            axis, _, size = arg.removeprefix("--config.mesh.").partition("=")
            config.mesh[axis] = int(size)
    mesh = parallel.make_mesh(config)
    record.update(
        kwargs=parallel.distributed_arguments(None, None, None, os.environ),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
        # What JAX hands the CUDA client: "all", or the GPUs it narrowed this process to.
        cuda_visible_devices=xla_bridge.CUDA_VISIBLE_DEVICES.value,
        mesh=dict(mesh.shape),
        # The process that owns each device of the (data, fsdp, tensor) grid.
        owners=[[[d.process_index for d in col] for col in row] for row in mesh.devices],
    )
if "FAKE_TASK_READY" in os.environ:
    Path(os.environ["FAKE_TASK_READY"]).touch()
if os.environ.get("PROBE_WAIT") == "1":
    if os.environ.get("PROBE_JAX") == "1":
        # As the trainer does with several processes: JAX's preemption service takes the
        # SIGTERM, and every process stops at the same step.
        from jax.experimental import multihost_utils

        step = 0
        while not multihost_utils.reached_preemption_sync_point(step):
            step += 1
            time.sleep(0.05)
        stopped.append(f"SIGTERM at step {step}")
    while not stopped:
        time.sleep(0.05)
    record["stopped_by"] = stopped[0]
with open(os.environ["PROBE_LOG"], "a") as f:
    f.write(json.dumps(record) + "\n")
print("probe:", *argv)
