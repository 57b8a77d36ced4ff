"""Every use of orbax's private or version-fragile behaviour, in one place.

Each piece names the orbax behaviour it works around and what happens on an orbax that lacks
it. The rule: when the private part is missing, the workaround does nothing (orbax's own
behaviour comes back: more lines on the console, or a slower exit after a failed save), and
never turns a failed save into another error than `CheckpointError`. Every import of
`orbax.checkpoint._src` sits inside the guard that makes it optional.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings

from diffusion_jax import paths

# --- the console: orbax's lines that say nothing to act on ---------------------------------


class _QuietOrbax(logging.Filter):
    """Drops orbax's log records that are expected here: the notice that a manager opened
    read-only is read-only, and the tracebacks that a failed save makes orbax's threads (and
    asyncio, for each of orbax's unfinished writes) log, which `CheckpointError` reports in
    one line, chained to the original error.

    Works around: orbax logging through absl, from files under .../orbax/..., with the text
    "is read only", and asyncio's "never retrieved" for orbax's tasks. On an orbax that logs
    otherwise the records pass: more console lines, nothing else changes."""

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
    the topology that wrote them. Idempotent.

    The warning filter matches orbax's wording ("Sharding info not provided when
    restoring"); on an orbax that words it otherwise the warning shows, nothing else."""
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
    at that error, and the writes left print a traceback each (thousands on a full disk).

    Works around: orbax closing its event loop while tensorstore still writes. Any other
    unraisable error goes to `previous`; where orbax waits for its writes, nothing is
    dropped."""

    def hook(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.quiets_orbax = True
    return hook


# --- a failed save: orbax's threads that would wait minutes ---------------------------------


def stop_commit_threads(timeout: float) -> None:
    """Ends orbax's commit threads of a failed save, so that the process can exit at once.

    Works around: when orbax cannot create a step's folder, its threads that would write into
    it keep waiting for the "folder created" signal for five minutes each, and the
    interpreter waits for them at exit (the hang of a read-only checkpoints/). Those are
    cancelled and sent the signal (`release_waiting`), so that they return without writing.
    Threads already writing get `timeout` seconds to end (their writes fail or finish
    quickly; cancelling them would leave tensorstore's writes running with no one to hear
    them), then whatever is left is released too. On an orbax without these internals no
    thread is found or released: the save still fails with `CheckpointError`, and the exit
    may wait for orbax's own timeout.
    """
    threads = commit_threads()
    release_waiting(threads)
    deadline = time.monotonic() + timeout
    for thread in threads:  # Thread's own join: orbax's raises a cancellation
        threading.Thread.join(thread, timeout=max(0.0, deadline - time.monotonic()))
    release_waiting([t for t in threads if t.is_alive()], all_of_them=True)
    # Cancelled threads drop their writes unstarted; Python would say so at exit.
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)


def commit_threads() -> list[threading.Thread]:
    """Orbax's live commit threads, instances of its private `_SignalingThread` (none if this
    orbax has no such module or class)."""
    try:
        from orbax.checkpoint._src.futures import future as ocp_future
    except ImportError:
        return []
    thread_type = getattr(ocp_future, "_SignalingThread", ())
    return [t for t in threading.enumerate() if isinstance(t, thread_type) and t.is_alive()]


def release_waiting(threads, all_of_them: bool = False) -> None:
    """Cancels the orbax threads still waiting for a signal (or all of them) and sends them
    their signals: a cancelled thread returns as soon as it wakes.

    Uses orbax's private signaling client, signal keys, `set_signals` and the threads'
    `_receive_signals` / `_operation_id`. Does nothing on an orbax without these internals:
    the imports are inside the guard, so a missing private module is no error."""
    try:
        from orbax.checkpoint._src.futures import future as ocp_future
        from orbax.checkpoint._src.futures import signaling_client

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


# --- orbax's folder names -------------------------------------------------------------------

# Orbax writes step N into N.orbax-checkpoint-tmp-<time> and renames it when done; on an orbax
# that names them otherwise nothing matches, and its own cleanup_tmp_directories clears
# them at the next start.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def tmp_dirs(directory, step: int) -> list:
    """The temporary folders orbax left for `step` in `directory` (a save that failed)."""
    return list(paths.path(directory).glob(f"{step}{TMP_SUFFIX}*"))
