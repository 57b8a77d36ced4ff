"""The device mesh, the shardings of the state and the batch, and multi-host helpers.

One `Mesh` with axes ('data', 'fsdp'): the batch is split over both, parameters (and with
them the EMA and the optimizer moments) are split over 'fsdp' along the dimension their
logical axis annotation names (or their largest divisible one), and replicated over 'data'.
Batches move between the host and the mesh through `to_global` (process-local rows in),
`local_rows` (this process's rows out) and `gather` (every row, on every process).
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

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
# Logical axes of the model's kernels (models/layers.py) in order of preference for FSDP.
FSDP_LOGICAL_AXES = ("embed_out", "embed_in")
# Arrays smaller than this stay replicated: splitting them costs more than it saves.
MIN_FSDP_SIZE = 2**12


def make_mesh(config, devices=None) -> Mesh:
    """The ('data', 'fsdp') mesh of config.mesh over `devices` (default: all devices).

    `mesh_utils.create_device_mesh` orders devices so that 'fsdp', the inner axis, follows
    the fastest interconnect on TPU slices and GPU nodes.
    """
    devices = jax.devices() if devices is None else devices
    shape = config_lib.mesh_shape(config, len(devices))
    num_slices = _num_granules(devices)
    try:
        if num_slices > 1 and shape[0] % num_slices == 0:
            # Several GPU nodes (or TPU slices): 'data' spans them over the slower network,
            # 'fsdp' stays inside one, on NVLink / ICI.
            grid = mesh_utils.create_hybrid_device_mesh(
                (shape[0] // num_slices, shape[1]), (num_slices, 1), devices
            )
        else:
            grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError, AttributeError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, (DATA, FSDP))


def _num_granules(devices) -> int:
    """Number of TPU slices, or of processes for GPUs (one per node); 1 on CPU."""
    platform = devices[0].platform
    if platform == "tpu" and hasattr(devices[0], "slice_index"):
        return len({d.slice_index for d in devices})
    if platform == "gpu":
        return len({d.process_index for d in devices})
    return 1


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, logical_axes, fsdp_size: int) -> P:
    """Where one array goes: its preferred logical axis over 'fsdp' if divisible, else its
    largest divisible dimension, else replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
        return P()
    candidates = []
    if logical_axes:
        candidates = [logical_axes.index(a) for a in FSDP_LOGICAL_AXES if a in logical_axes]
    candidates += sorted(range(len(shape)), key=lambda i: -shape[i])
    for dim in candidates:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


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
    fsdp_size = mesh.shape[FSDP]
    if logical_axes is None:
        logical_axes = jax.tree.map(lambda _: None, abstract_params)
    return jax.tree.map(
        lambda x, axes: NamedSharding(mesh, fsdp_spec(x.shape, axes, fsdp_size)),
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
    process on one machine needs none of it.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    auto = "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1
    auto = auto or os.environ.get("DIFFUSION_JAX_DISTRIBUTED") == "1"  # set by tpu_pod.sh
    if coordinator_address or auto:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            # Collectives across processes on CPU (the local dress rehearsal) go over gloo.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def is_main_process() -> bool:
    return jax.process_index() == 0


def log_topology(mesh: Mesh, global_batch: int) -> None:
    log.info(
        "process %d/%d: %d local devices, %d global (%s); mesh %s; per-host batch %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        dict(mesh.shape),
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
