"""The device mesh, the shardings of the state and the batch, and multi-host helpers.

One `Mesh` with axes ('data', 'fsdp', 'tensor'), 'tensor' innermost. The batch is split over
'data' x 'fsdp' and replicated over 'tensor'. Parameters (and with them the EMA and the
optimizer moments) follow logical-axis rules on the names their kernels are annotated with
(models/layers.py): attention heads and MLP hidden units ("heads", "mlp") split over 'tensor'
(Megatron-style model parallelism: each device computes its own heads and hidden units), and
one other dimension over 'fsdp' ("embed", else "embed_out", "embed_in", else the largest that
divides); a dimension the axis size does not divide stays whole on that axis. Batches move
between the host and the mesh through `to_global` (process-local rows in), `local_rows` (this
process's rows out) and `gather` (every row, on every process).
"""

from __future__ import annotations

import logging
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_jax import config as config_lib
from diffusion_jax import errors, validation

log = logging.getLogger(__name__)

DATA, FSDP, TENSOR = config_lib.MESH_AXES
BATCH_AXES = (DATA, FSDP)
# The logical-axis rules: kernel dimensions named here go over 'tensor' ...
TENSOR_LOGICAL_AXES = ("heads", "mlp")
# ... and these, in order of preference, over 'fsdp'.
FSDP_LOGICAL_AXES = ("embed", "embed_out", "embed_in")
# Arrays smaller than this stay replicated over 'fsdp': splitting them costs more than it
# saves. (The 'tensor' split is kept at any size, so that a block's layout is uniform.)
MIN_FSDP_SIZE = 2**12


def make_mesh(config, devices=None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh of config.mesh over `devices` (default: all).

    `mesh_utils.create_device_mesh` orders devices so that the inner axes, 'tensor' then
    'fsdp', follow the fastest interconnect on TPU slices and GPU nodes. Raises ConfigError
    when 'tensor' would span processes (each process must hold whole batch shards).
    """
    devices = jax.devices() if devices is None else devices
    data, fsdp, tensor = validation.mesh_shape(config, len(devices))
    num_slices = _num_granules(devices)
    try:
        if num_slices > 1 and data % num_slices == 0:
            # Several GPU nodes (or TPU slices): 'data' spans them over the slower network,
            # 'fsdp' and 'tensor' stay inside one, on NVLink / ICI.
            grid = mesh_utils.create_hybrid_device_mesh(
                (data // num_slices, fsdp, tensor), (num_slices, 1, 1), devices
            )
        else:
            grid = mesh_utils.create_device_mesh((data, fsdp, tensor), devices)
    except (ValueError, AssertionError, NotImplementedError, AttributeError):
        grid = np.asarray(devices).reshape(data, fsdp, tensor)
    _check_batch_shards_per_process(grid)
    return Mesh(grid, config_lib.MESH_AXES)


def _check_batch_shards_per_process(grid: np.ndarray) -> None:
    """Each process feeds its own rows (`to_global`), so every batch shard, the devices along
    'tensor' at one (data, fsdp) position, must belong to one process."""
    owners = np.vectorize(lambda d: d.process_index)(grid)
    if (owners != owners[..., :1]).any():
        per_process = int((owners == owners.flat[0]).sum())
        raise errors.ConfigError(
            f"config.mesh.tensor: {grid.shape[-1]} devices along 'tensor' span several "
            f"processes; use a divisor of the {per_process} devices of one process"
        )


def _num_granules(devices) -> int:
    """Number of TPU slices, or of processes for GPUs (one per node); 1 on CPU."""
    platform = devices[0].platform
    if platform == "tpu" and hasattr(devices[0], "slice_index"):
        return len({d.slice_index for d in devices})
    if platform == "gpu":
        return len({d.process_index for d in devices})
    return 1


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over 'data' x 'fsdp', replicated over 'tensor'."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_spec(shape, logical_axes, fsdp_size: int, tensor_size: int = 1) -> P:
    """Where one parameter goes under the logical-axis rules: its first dimension named in
    TENSOR_LOGICAL_AXES over 'tensor' if the size divides it; then, for arrays of at least
    MIN_FSDP_SIZE elements, its preferred FSDP_LOGICAL_AXES dimension over 'fsdp' if
    divisible, else its largest divisible dimension; anything else replicated."""
    spec = [None] * len(shape)
    names = tuple(logical_axes) if logical_axes else (None,) * len(shape)
    if tensor_size > 1:
        for dim, name in enumerate(names):
            if name in TENSOR_LOGICAL_AXES and shape[dim] % tensor_size == 0:
                spec[dim] = TENSOR
                break
    if fsdp_size > 1 and int(np.prod(shape, dtype=np.int64)) >= MIN_FSDP_SIZE:
        preferred = [names.index(a) for a in FSDP_LOGICAL_AXES if a in names]
        by_size = sorted(range(len(shape)), key=lambda i: -shape[i])
        for dim in preferred + by_size:
            if spec[dim] is None and shape[dim] % fsdp_size == 0:
                spec[dim] = FSDP
                break
    return P(*spec) if any(spec) else P()


def logical_axes_tree(boxed_params):
    """The logical axis names of each parameter (None where unannotated), from `model.init`
    output evaluated with `jax.eval_shape` (boxed in `nn.LogicallyPartitioned`)."""
    specs = nn.get_partition_spec(boxed_params)
    return jax.tree.map(
        lambda s: tuple(s) if isinstance(s, P) and len(s) else None,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def params_shardings(mesh: Mesh, abstract_params, logical_axes=None):
    """NamedShardings for a parameter pytree (also used for the EMA and Adam moments)."""
    sizes = mesh.shape[FSDP], mesh.shape[TENSOR]
    if logical_axes is None:
        logical_axes = jax.tree.map(lambda _: None, abstract_params)
    return jax.tree.map(
        lambda x, axes: NamedSharding(mesh, param_spec(x.shape, axes, *sizes)),
        abstract_params,
        logical_axes,
        is_leaf=lambda x: x is None,
    )


def state_shardings(mesh: Mesh, abstract_state, abstract_params, logical_axes=None):
    """Shardings of a whole TrainState: every subtree shaped like the parameters (params, EMA,
    optimizer moments) gets the parameter shardings; everything else is replicated."""
    params_sh = params_shardings(mesh, abstract_params, logical_axes)
    param_tree = jax.tree.structure(abstract_params)

    def is_params_like(x):
        return jax.tree.structure(x) == param_tree

    return jax.tree.map(
        lambda x: params_sh if is_params_like(x) else replicated(mesh),
        abstract_state,
        is_leaf=is_params_like,
    )


def enable_compilation_cache() -> None:
    """Repeated runs reuse compiled programs: JAX's persistent cache, in
    $JAX_COMPILATION_CACHE_DIR or ~/.cache/diffusion_jax/xla."""
    if not jax.config.jax_compilation_cache_dir:
        path = os.path.expanduser("~/.cache/diffusion_jax/xla")
        jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Starts `jax.distributed` when this is one process of several.

    Explicit flags win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID from the environment; otherwise, under SLURM with several tasks or with
    DIFFUSION_JAX_DISTRIBUTED=1 (Cloud TPU pods), JAX finds everything itself. A single
    process on one machine needs none of it. `distributed_arguments` says what JAX is given.
    """
    kwargs = distributed_arguments(coordinator_address, num_processes, process_id, os.environ)
    if kwargs is None:
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # Collectives across processes on CPU (the local dress rehearsal) go over gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def distributed_arguments(coordinator_address, num_processes, process_id, env) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a lone process.

    Under SLURM with one task per node, that task drives every GPU of its node. JAX's own
    SLURM detection would make it see only GPU number SLURM_LOCALID, even when the three
    arguments are given (jax-ml/jax#16788), so here they come from SLURM's variables and
    JAX's detection is switched off, which leaves every local device visible. With several
    tasks per node, JAX's one GPU per task stands.
    """
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    auto = "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1
    auto = auto or env.get("DIFFUSION_JAX_DISTRIBUTED") == "1"  # set by tpu_pod.sh
    if not (coordinator_address or auto):
        return None
    kwargs = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if _slurm_tasks_per_node(env) == 1:
        kwargs["coordinator_address"] = coordinator_address or _slurm_coordinator(env)
        if num_processes is None:
            kwargs["num_processes"] = int(env["SLURM_NTASKS"])
        if process_id is None:
            kwargs["process_id"] = int(env["SLURM_PROCID"])
        kwargs["cluster_detection_method"] = "deactivate"
    return kwargs


# What JAX needs to see to take a process for one task of a SLURM job step.
SLURM_STEP_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
)


def _slurm_tasks_per_node(env) -> int | None:
    """The most tasks this SLURM job step runs on one node; None outside a step or unknown.

    SLURM_STEP_TASKS_PER_NODE reads like '1(x4)' or '2(x3),1'."""
    if not all(name in env for name in SLURM_STEP_VARIABLES):
        return None
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        return max(int(part.split("(")[0]) for part in spec.split(","))
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES")
    if nodes and int(env["SLURM_NTASKS"]) % int(nodes) == 0:
        return int(env["SLURM_NTASKS"]) // int(nodes)
    return None


def slurm_coordinator_port(job_id: int) -> int:
    """The coordinator's port for a SLURM job, as launch/slurm_gpu.sbatch picks it: one per
    job id, so that two jobs sharing a head node do not collide, and below Linux's
    ephemeral range (32768 and up), so that no outgoing connection holds it."""
    return 10000 + job_id % 20000


def _slurm_coordinator(env) -> str:
    """'host:port' of the step's first node: 'node[001-004],gpu7' -> 'node001'."""
    prefix, bracket, rest = env["SLURM_STEP_NODELIST"].split(",")[0].partition("[")
    host = prefix + rest.split("-")[0].rstrip("]") if bracket else prefix
    port = env.get("JAX_COORDINATOR_PORT") or slurm_coordinator_port(int(env["SLURM_JOB_ID"]))
    return f"{host}:{port}"


def is_main_process() -> bool:
    return jax.process_index() == 0


def describe(mesh: Mesh) -> str:
    """'data=2 x fsdp=2 x tensor=2'."""
    return " x ".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def log_topology(mesh: Mesh, global_batch: int) -> None:
    log.info(
        "process %d/%d: %d local devices, %d global (%s); mesh %s; per-host batch %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        describe(mesh),
        global_batch // jax.process_count(),
    )


def padded_batch(num: int, num_devices: int) -> int:
    """The smallest batch >= num that splits evenly over the devices."""
    return -(-num // num_devices) * num_devices


def to_global(batch, mesh: Mesh):
    """Process-local rows -> global arrays sharded over the batch axes of the mesh; `batch` is
    one array or a dict of arrays, each (B_local, ...) with B_local = B / process_count."""
    sharding = batch_sharding(mesh)

    def one(rows):
        return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(rows))

    return {k: one(v) for k, v in batch.items()} if isinstance(batch, dict) else one(batch)


def local_rows(array: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array (the inverse of `to_global`)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(
        multihost_utils.global_array_to_host_local_array(array, mesh, batch_sharding(mesh).spec)
    )


def gather(x) -> np.ndarray:
    """A global array as one host NumPy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
