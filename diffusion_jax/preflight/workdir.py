"""Pre-flight of the workdir: a directory (or a bucket's prefix) this process can write in,
with room for two checkpoints of this model (train), or holding what a job reads: a
checkpoint (eval, sample, export), EMA snapshots (posthoc_ema); in a run of several
processes, the same workdir for all of them. Nothing here writes, but for small files made
and removed at once to learn whether writing works, and whether the others see them."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import jax
import numpy as np

from diffusion_jax import checkpointing, paths
from diffusion_jax.errors import ConfigError, first_line
from diffusion_jax.run import schedule_from_config

# Bytes a checkpoint holds per parameter: params, EMA and Adam's two moments, float32.
CHECKPOINT_BYTES_PER_PARAMETER = 16


def checkpoint_bytes(config) -> int:
    """The size of one checkpoint of this model, from its parameter shapes (no allocation)."""
    from diffusion_jax import objectives
    from diffusion_jax.models.factory import abstract_params

    objective = objectives.for_config(config, schedule_from_config(config))
    shapes = abstract_params(objective.create_model(config), *objective.init_inputs(config))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    profiles = 4 * len(config.optim.ema_sigma_rels)  # the power-function EMAs, float32
    return count * (CHECKPOINT_BYTES_PER_PARAMETER + profiles)


def _existing_ancestor(path):
    path = paths.path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_workdir(workdir, needed_bytes: int) -> None:
    """A directory (or a path one can be made at) where this process can write, with room
    for two checkpoints (a new one is complete before the oldest is removed). In a bucket:
    a small object can be written and removed (there is no disk to measure)."""
    where = f"--workdir={workdir}"
    if paths.is_remote(workdir):
        _check_bucket_writable(paths.path(workdir), where)
        return
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{where}: is a file, not a directory; give a directory")
    base = _existing_ancestor(workdir)
    if not base.is_dir():
        raise ConfigError(f"{where}: {base} is a file, not a directory")
    for path in (base, workdir / "checkpoints"):
        if path.is_dir() and not _can_write_in(path):
            raise ConfigError(
                f"{where}: cannot write in {path} (permissions, or a read-only file system); "
                "fix it or use another --workdir"
            )
    free = shutil.disk_usage(base).free
    if needed_bytes and free < 2 * needed_bytes:
        raise ConfigError(
            f"{where}: {free / 2**20:.0f} MiB free on its disk, a checkpoint of this model "
            f"needs {needed_bytes / 2**20:.0f} MiB (two are kept while a save completes); free "
            "space or use another --workdir"
        )


def check_reachable(workdir) -> None:
    """A bucket workdir can be reached at all (network, credentials): the first thing a job
    reads there is its config.json, and a failure then is one line, not a traceback."""
    if not paths.is_remote(workdir):
        return
    try:
        where = paths.path(workdir)
    except ConfigError as e:  # an unsupported scheme
        raise ConfigError(f"--workdir={e}") from e
    try:
        where.exists()
    except Exception as e:  # noqa: BLE001 - no network, no credentials, a malformed name
        raise ConfigError(
            f"--workdir={workdir}: cannot reach it ({first_line(e, named=True, limit=160)}); "
            "check the network, the bucket's name and the credentials "
            "(gcloud auth application-default login)"
        ) from e


def _check_bucket_writable(workdir, where: str) -> None:
    probe = workdir / f".diffusion_jax_write_check-{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - a missing bucket, no permission, no credentials
        raise ConfigError(
            f"{where}: cannot write in it ({first_line(e, named=True, limit=160)}); check the "
            "bucket's name, that it exists and that these credentials may write to it"
        ) from e


def check_shared_workdir(workdir) -> None:
    """Every process of a multi-process run sees the same workdir: process 0 writes a token
    in it (making the folder, on a disk), the others look for it there. Orbax writes one
    checkpoint from all processes into one folder, so a local folder on each host would
    leave every checkpoint in pieces. All processes raise the same one line together."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = multihost_utils.broadcast_one_to_all(np.frombuffer(uuid.uuid4().bytes, np.uint32))
    probe = paths.path(workdir) / f".diffusion_jax_shared_check-{bytes(np.asarray(token)).hex()}"
    written = None  # process 0's failure to write, if any: every process must reach the syncs
    if jax.process_index() == 0:
        try:
            paths.write_bytes(probe, b"")
        except Exception as e:  # noqa: BLE001 - reported below, by every process alike
            written = e
    multihost_utils.sync_global_devices("shared workdir token written")
    try:
        sees = np.asarray([probe.exists()], np.int32)
    except Exception:  # noqa: BLE001 - a failed look is a "no": every process reaches the gather
        sees = np.zeros(1, np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(sees)).reshape(-1)
    multihost_utils.sync_global_devices("shared workdir token read")
    if jax.process_index() == 0 and written is None:
        probe.unlink()
    blind = [i for i, ok in enumerate(everyone) if not ok]
    if blind and blind[0] == 0:
        reason = f" ({first_line(written, named=True, limit=160)})" if written else ""
        raise ConfigError(
            f"--workdir={workdir}: process 0 cannot write in it{reason}; fix the permissions "
            "or the bucket's name, or use another --workdir"
        )
    if blind:
        raise ConfigError(
            f"--workdir={workdir}: process(es) {blind} of {jax.process_count()} do not see the "
            "files process 0 writes there (a local folder on each host?); give a folder every "
            "host shares (NFS, Lustre) or a bucket (gs://...)"
        )


def _can_write_in(folder) -> bool:
    """Whether a file can be made in `folder`: tried, since permission bits do not tell for
    root, read-only mounts or immutable folders. The file is gone when this returns."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".diffusion_jax_write_check"):
            return True
    except OSError:
        return False


def check_posthoc(config, workdir) -> None:
    """--mode=posthoc_ema: a width to rebuild, snapshots to rebuild it from, room to write."""
    e = config.eval
    if not (e.ema_sigma_rel > 0 or e.ema_sigma_rels):
        raise ConfigError(
            "config.eval.ema_sigma_rel: set the width to rebuild (e.g. 0.07), or a sweep in "
            "config.eval.ema_sigma_rels"
        )
    where = checkpointing.checkpoint_dir(workdir, checkpointing.EMA_SNAPSHOTS)
    manager = checkpointing.make_manager(
        workdir, read_only=True, folder=checkpointing.EMA_SNAPSHOTS
    )
    steps = sorted(manager.all_steps()) if where.is_dir() else []
    up_to = e.checkpoint_step
    if up_to >= 0 and steps and up_to not in steps:
        raise ConfigError(
            f"config.eval.checkpoint_step: no EMA snapshot at step {up_to} in {where} (have "
            f"{steps}); the EMA is rebuilt at a snapshot's step"
        )
    if not [s for s in steps if up_to < 0 or s <= up_to]:
        upto = f" up to config.eval.checkpoint_step={up_to}" if up_to >= 0 and steps else ""
        raise ConfigError(
            f"{where}: no EMA snapshot{upto} to rebuild from; train with "
            "optim.ema_sigma_rels and training.ema_snapshot_every > 0"
        )
    check_writable_workdir(workdir, 0)


def check_has_checkpoint(config, workdir) -> None:
    """A workdir with a checkpoint to read (and the one eval.checkpoint_step names)."""
    where = checkpointing.checkpoint_dir(workdir)
    steps = (
        sorted(checkpointing.make_manager(workdir, read_only=True).all_steps())
        if where.is_dir()
        else []
    )
    if not steps:
        raise ConfigError(
            f"{where}: no checkpoint to read; train first (--mode=train with this --workdir), "
            "or set eval.params_file to an exported .msgpack"
        )
    step = config.eval.checkpoint_step
    if step >= 0 and step not in steps:
        raise ConfigError(
            f"config.eval.checkpoint_step: no checkpoint {step} in {where} (have {steps})"
        )
