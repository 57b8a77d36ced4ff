"""Writing checkpoints: the manager of a checkpoint folder, asynchronous saves, and the
training run's `Saver`, which turns every failed save into one-line `CheckpointError`."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from typing import NoReturn

import jax
import orbax.checkpoint as ocp

from diffusion_jax import paths
from diffusion_jax.checkpointing import orbax_compat
from diffusion_jax.errors import CheckpointError, first_line

log = logging.getLogger(__name__)

# How long a failed save may take to stop writing before its folder is removed anyway.
ABANDON_SECONDS = 30

# Snapshots of the power-function EMAs (training.ema_snapshot_every), beside checkpoints/.
EMA_SNAPSHOTS = "ema_snapshots"


def checkpoint_dir(workdir, folder: str = "checkpoints") -> paths.Path:
    """The absolute path (or the object prefix) of <workdir>/<folder>."""
    return paths.path(workdir) / folder


def make_manager(
    workdir,
    *,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    read_only: bool = False,
    folder: str = "checkpoints",
) -> ocp.CheckpointManager:
    """Orbax's manager of <workdir>/<folder>: numbered steps, each a "state" pytree and a
    "meta" JSON item; `max_to_keep=None` keeps every step (the EMA snapshots)."""
    orbax_compat.quiet_orbax()
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
    try:
        return ocp.CheckpointManager(
            checkpoint_dir(workdir, folder),
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
    except OSError as e:  # creating the folder or clearing an old temporary one
        errno_, reason = failure_reason(e)
        raise CheckpointError(
            f"{folder}: could not write {checkpoint_dir(workdir, folder)}: {reason}; "
            f"{_advice(errno_)}, then run the same command again"
        ) from e


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, *, force=False) -> bool:
    """Starts an asynchronous save of `state` (any sharding; every host writes its shards)
    and `meta` (JSON) at `step`; training goes on while it is written. Returns whether
    orbax started one (it skips steps its options do not save, unless `force`)."""
    saved = manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )
    if saved:
        log.info(
            "%s: saving step %d to %s", paths.path(manager.directory).name, step, manager.directory
        )
    return saved


class Saver:
    """The training run's checkpoint writer.

    Saves run in orbax's background threads, and orbax reports a failure there only at the
    next save (hours later, maybe) or at exit. `poll` notices it at the next step instead,
    and every failure ends in `CheckpointError` after `_abandon` has made sure that no orbax
    thread is left waiting (the interpreter would wait for it at exit).
    """

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self._in_flight = None  # the step being written in the background

    def save(self, step: int, state, meta: dict) -> None:
        """Waits for the save in flight, then starts saving `step`; CheckpointError if either
        fails."""
        # The previous save's failure is its own, named by its step, not this one's.
        self.wait()
        try:
            saved = save(self.manager, step, state, meta)
        except Exception as e:  # noqa: BLE001 - every failure to write ends the same way
            self._fail(step, e)
        if saved:
            self._in_flight = step

    def poll(self) -> None:
        """Raises CheckpointError if the save in flight has failed; does not wait for it."""
        if self._in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Waits for the save in flight, if any."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(step, e)

    def close(self) -> None:
        """Waits for the save in flight and closes the manager."""
        self.wait()
        self.manager.close()

    def _fail(self, step: int, error: BaseException) -> NoReturn:
        """Abandons the failed save of `step` and raises the one-line CheckpointError naming
        the folder, the reason, the fix and the checkpoint a rerun resumes from."""
        _abandon(self.manager, step)
        directory = paths.path(self.manager.directory)
        errno_, reason = failure_reason(error)
        earlier = [s for s in self.manager.all_steps() if s < step]
        resumes = f"checkpoint {max(earlier)}" if earlier else "step 0 (no checkpoint yet)"
        raise CheckpointError(
            f"checkpoint {step}: could not write {directory}: {reason}; {_advice(errno_)}, "
            f"then run the same command again: it resumes from {resumes}"
        ) from error


def failure_reason(error: BaseException) -> tuple[int | None, str]:
    """(errno, one-line reason) of a failed write: the first OSError in the exception's
    chain, or the OS error code tensorstore writes into its messages, or the first line."""
    seen = set()
    e = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno, e.strerror or os.strerror(e.errno)
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            return int(code[1]), os.strerror(int(code[1]))
        e = e.__cause__ or e.__context__
    return None, first_line(error, named=True, limit=200)


def _advice(errno_: int | None) -> str:
    """What to do about a write that failed with `errno_`, as the middle of a sentence."""
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable (or use another --workdir)"
    if errno_ in (errno.ENOSPC, errno.EDQUOT):
        return "free space on its disk (or lower training.max_to_keep)"
    if errno_ in (errno.ENOENT, errno.ENOTDIR):
        return "check that the folder still exists"
    return "fix that"


def _abandon(manager: ocp.CheckpointManager, step: int) -> None:
    """Ends a failed save so that the process can exit at once and leaves no partial folder:
    orbax's threads are stopped (`orbax_compat.stop_commit_threads`), the manager closed, and
    the step's temporary folders removed (on process 0)."""
    orbax_compat.stop_commit_threads(timeout=ABANDON_SECONDS)
    with contextlib.suppress(Exception):  # it raises the failure again
        manager.close()
    if jax.process_index() == 0:
        for tmp in orbax_compat.tmp_dirs(manager.directory, step):
            with contextlib.suppress(OSError):
                paths.rmtree(tmp)
