"""Checkpoints with orbax: asynchronous saves of the whole TrainState and the data position,
keep-N, restore of the newest good step into whatever mesh the current run uses.

Layout: <workdir>/checkpoints/<step>/{state,meta}. Orbax writes each step into a temporary
directory and renames it (or, on object stores, writes a commit marker) when all hosts are
done, so a run killed mid-save leaves the previous step as the newest complete one. A step
that is present but unreadable while an older one reads is moved aside to <step>.corrupt
with a warning naming it, so that no later job trips on it. A save that fails (permissions,
a full disk) ends the run with one line, `CheckpointError`, and leaves the earlier steps as
they were.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import NoReturn

import jax
import orbax.checkpoint as ocp

from diffusion_jax.errors import CheckpointError, ConfigError, first_line

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
# How long a failed save may take to stop writing before its folder is removed anyway.
ABANDON_SECONDS = 30


# Snapshots of the power-function EMAs (training.ema_snapshot_every), beside checkpoints/.
EMA_SNAPSHOTS = "ema_snapshots"


def checkpoint_dir(workdir, folder: str = "checkpoints") -> Path:
    return Path(workdir).absolute() / folder


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
    quiet_orbax()
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


# --- the console: orbax's lines that say nothing to act on ---------------------------------


class _QuietOrbax(logging.Filter):
    """Drops orbax's log records that are expected here: the notice that a manager opened
    read-only is read-only, and the tracebacks that a failed save makes orbax's threads (and
    asyncio, for each of orbax's unfinished writes) log, which `CheckpointError` reports in
    one line, chained to the original error."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "asyncio":
            return not ("never retrieved" in message and "orbax" in message)
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno >= logging.ERROR and record.exc_info:
            return False
        return "is read only" not in message


_QUIET = _QuietOrbax()


def quiet_orbax() -> None:
    """Installs `_QuietOrbax` on the loggers of absl (which orbax logs through) and asyncio
    and `_unraisable_hook`, and ignores orbax's warning about reading shardings from the
    file, which only restores without a target (tests, tools) raise and which is harmless on
    the topology that wrote them. Idempotent."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    warnings.filterwarnings(
        "ignore", message="Sharding info not provided when restoring", module=r"orbax\."
    )
    if not getattr(sys.unraisablehook, "quiets_orbax", False):
        sys.unraisablehook = _unraisable_hook(sys.unraisablehook)


def _unraisable_hook(previous):
    """A hook that drops "Event loop is closed", which tensorstore reports for each write that
    ends after orbax's thread stopped listening: when one write of a save fails, orbax stops
    at that error, and the writes left print a traceback each (thousands on a full disk)."""

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.quiets_orbax = True
    return hook


# --- saving ---------------------------------------------------------------------------------


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, *, force=False) -> bool:
    """Starts an asynchronous save of `state` (any sharding; every host writes its shards)
    and `meta` (JSON) at `step`; training goes on while it is written."""
    saved = manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )
    if saved:
        log.info("%s: saving step %d to %s", Path(manager.directory).name, step, manager.directory)
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
        _abandon(self.manager, step)
        directory = Path(self.manager.directory)
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
    if errno_ in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable (or use another --workdir)"
    if errno_ in (errno.ENOSPC, errno.EDQUOT):
        return "free space on its disk (or lower training.max_to_keep)"
    if errno_ in (errno.ENOENT, errno.ENOTDIR):
        return "check that the folder still exists"
    return "fix that"


def _abandon(manager: ocp.CheckpointManager, step: int) -> None:
    """Ends a failed save so that the process can exit at once and leaves no partial folder.

    When orbax cannot create a step's folder, its threads that would write into it keep
    waiting for the "folder created" signal for five minutes each, and the interpreter waits
    for them at exit: the hang of a read-only checkpoints/. Those are cancelled and sent the
    signal, so that they return without writing. Threads already writing are left to end
    (their writes fail or finish quickly; cancelling them would leave tensorstore's writes
    running with no one to hear them), then the folder is removed.
    """
    threads = _orbax_threads()
    _release_waiting(threads)
    deadline = time.monotonic() + ABANDON_SECONDS
    for thread in threads:  # Thread's own join: orbax's raises a cancellation
        threading.Thread.join(thread, timeout=max(0.0, deadline - time.monotonic()))
    _release_waiting([t for t in threads if t.is_alive()], all_of_them=True)
    # Cancelled threads drop their writes unstarted; Python would say so at exit.
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
    with contextlib.suppress(Exception):  # it raises the failure again
        manager.close()
    if jax.process_index() == 0:
        for tmp in Path(manager.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _orbax_threads() -> list[threading.Thread]:
    """Orbax's live commit threads (none if this orbax has no such class)."""
    try:
        from orbax.checkpoint._src.futures import future as ocp_future
    except ImportError:
        return []
    thread_type = getattr(ocp_future, "_SignalingThread", ())
    return [t for t in threading.enumerate() if isinstance(t, thread_type) and t.is_alive()]


def _release_waiting(threads, all_of_them: bool = False) -> None:
    """Cancels the orbax threads still waiting for a signal (or all of them) and sends them
    their signals: a cancelled thread returns as soon as it wakes. Does nothing on an orbax
    without these internals."""
    from orbax.checkpoint._src.futures import future as ocp_future
    from orbax.checkpoint._src.futures import signaling_client

    try:
        client = signaling_client.get_signaling_client()
        key = ocp_future.AwaitableSignalsContract.get_unique_awaitable_singal_key
        for thread in threads:
            signals, operation = thread._receive_signals, thread._operation_id
            received = [client.key_value_try_get(key(s, operation)) for s in signals]
            if all_of_them or None in received:
                thread.cancel()
                ocp_future.set_signals(signals, operation_id=operation)
    except (AttributeError, ImportError):
        return


# --- restoring ------------------------------------------------------------------------------


def _restore_args(abstract):
    return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)


def check_text_encoder(stored_params, expected_params, source: str) -> None:
    """One line naming training.train_text_encoder when parameters stored in `source` (a
    checkpoint or a file) hold a text encoder and the config's network does not, or the
    other way round."""
    if ("text_encoder" in stored_params) != ("text_encoder" in expected_params):
        raise ConfigError(
            f"config.training.train_text_encoder: {source} was written with "
            f"train_text_encoder={'text_encoder' in stored_params}; set it to match"
        )


def check_shapes(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
    """Fails with one line naming the first parameter whose stored shape differs (or the
    config field, where one setting explains the difference)."""
    stored = manager.item_metadata(step)["state"]["params"]
    check_text_encoder(stored, abstract_params, f"checkpoint {step}")
    stored_flat = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    expected_flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    for path, expected in expected_flat:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if path not in stored_flat:
            raise ConfigError(
                f"checkpoint {step}: parameter {name} is missing; it was written by a "
                "different model config"
            )
        got = tuple(stored_flat[path].shape)
        if got != tuple(expected.shape) and "class_embedder.embedding_table" in name:
            # A label table has a null row exactly when training drops labels.
            raise ConfigError(
                f"config.training.cond_drop_prob: checkpoint {step} has {got[0]} rows in "
                f"{name}, this config {expected.shape[0]}: the null label's row comes with "
                "cond_drop_prob > 0; set it as the run was trained"
            )
        if got != tuple(expected.shape):
            raise ConfigError(
                f"checkpoint {step}: parameter {name} has shape {got}, the model config "
                f"expects {tuple(expected.shape)}"
            )
    if len(stored_flat) != len(expected_flat):
        extra = sorted(set(stored_flat) - {p for p, _ in expected_flat})
        name = jax.tree_util.keystr(extra[0], simple=True, separator="/") if extra else "?"
        raise ConfigError(f"checkpoint {step}: parameter {name} is not in this model config")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(state, meta) of `step`, each array placed with the sharding in `abstract_state` (a
    pytree of jax.ShapeDtypeStruct with .sharding), so any mesh can restore any checkpoint."""
    check_shapes(manager, step, abstract_state.params)
    stored = manager.item_metadata(step)["state"]
    item = abstract_state
    num_profiles = len(abstract_state.power_emas)
    stored_profiles = len(stored.get("power_emas") or ())
    if stored_profiles != num_profiles:
        raise ConfigError(
            f"config.optim.ema_sigma_rels: checkpoint {step} tracks {stored_profiles} "
            f"power-function EMA(s), this config {num_profiles}; resume with the run's "
            "optim.ema_sigma_rels (its config.json) or use a new --workdir"
        )
    if "power_emas" not in stored:  # written before power-function EMAs existed
        item = {k: v for k, v in vars(abstract_state).items() if k != "power_emas"}
    state, meta = restore_tree(manager, step, item)
    if isinstance(state, dict):
        state = abstract_state.replace(**state)
    log.info("checkpoint: restored step %d from %s", step, manager.directory)
    return state, meta


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """(step, state, meta) of the newest readable checkpoint, or (None, None, None) when
    there is none; newer unreadable ones are moved aside (`first_readable`). A checkpoint
    of a different model config is an error, not something to skip."""
    steps = sorted(manager.all_steps(), reverse=True)
    step, restored = first_readable(manager, steps, lambda s: restore(manager, s, abstract_state))
    return (None, None, None) if step is None else (step, *restored)


def restore_ema(manager: ocp.CheckpointManager, step: int, abstract_params, profile=None):
    """Only the EMA parameters of `step` (no optimizer state is read), placed like
    `abstract_params`: the exponential EMA, or with `profile` = (index, count) the index-th of
    the `count` power-function EMAs the state tracks."""
    check_shapes(manager, step, abstract_params)
    if profile is None:
        item = {"ema_params": abstract_params}
    else:
        item = {"power_emas": (abstract_params,) * profile[1]}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=_restore_args(item), partial_restore=True
            )
        ),
    )
    if profile is None:
        log.info("checkpoint: restored the EMA parameters of step %d", step)
        return restored.state["ema_params"]
    log.info("checkpoint: restored power-function EMA %d of step %d", profile[0], step)
    return restored.state["power_emas"][profile[0]]


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """Only the "meta" JSON item of `step`."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_tree(manager: ocp.CheckpointManager, step: int, abstract_tree):
    """(tree, meta) of `step`: its "state" item, any pytree (a TrainState, the EMA
    snapshots), each array placed with the sharding in `abstract_tree`."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract_tree, restore_args=_restore_args(abstract_tree)
            ),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return restored.state, restored.meta


def first_readable(manager: ocp.CheckpointManager, steps, read, advice: str | None = None):
    """(step, read(step)) of the first of `steps`, in the order given, that `read` can read,
    or (None, None) when `steps` is empty.

    The ones tried before it were unreadable while it reads, so they are corrupt (orbax's
    rename means a killed save leaves no step at all: a disk or a copy garbled them): each is
    moved aside to <step>.corrupt (`move_aside`), so that no later job trips on it. When none
    can be read, the cause is more likely the code or the machine than every file:
    CheckpointError ending in `advice` (or a default), and nothing is moved. A checkpoint of
    another model config (ConfigError) is never skipped.
    """
    unreadable = []
    for step in steps:
        try:
            result = read(step)
        except (ConfigError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - orbax wraps bad data in bare Exceptions
            unreadable.append((step, e))
            continue
        for bad, error in unreadable:
            move_aside(manager, bad, error, instead=step)
        return step, result
    if unreadable:
        step, error = unreadable[0]
        if advice is None:
            others = "no other checkpoint reads either" if len(steps) > 1 else "it is the only one"
            advice = f"{others}, so none was moved aside: check that error, or move them away"
        raise CheckpointError(
            f"checkpoint {step}: could not read {Path(manager.directory) / str(step)}: "
            f"{first_line(error, named=True, limit=200)}; {advice}"
        ) from error
    return None, None


def move_aside(manager: ocp.CheckpointManager, step: int, error: BaseException, instead: int):
    """Renames the unreadable `step` to <step>.corrupt (<step>.corrupt.N if taken) on process
    0, with one warning line, and makes every process's manager forget it (orbax ignores
    such names)."""
    directory = Path(manager.directory)
    if jax.process_index() == 0:
        target = _free_name(directory / f"{step}{CORRUPT_SUFFIX}")
        try:
            (directory / str(step)).rename(target)
            where = f"moved it to {target}"
        except OSError as e:
            where = f"could not move it aside ({e.strerror})"
        log.warning(
            "checkpoint %s is unreadable (%s); %s; using checkpoint %d",
            directory / str(step),
            first_line(error, named=True, limit=200),
            where,
            instead,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    manager.reload()


def _free_name(path: Path) -> Path:
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
