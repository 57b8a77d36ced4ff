"""Corrupt steps: finding the newest step that reads, and moving the unreadable ones newer
than it aside to <step>.corrupt so that no later job trips on them."""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp

from diffusion_jax import paths
from diffusion_jax.errors import CheckpointError, ConfigError, first_line

log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"


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
            f"checkpoint {step}: could not read {paths.path(manager.directory) / str(step)}: "
            f"{first_line(error, named=True, limit=200)}; {advice}"
        ) from error
    return None, None


def move_aside(manager: ocp.CheckpointManager, step: int, error: BaseException, instead: int):
    """Renames the unreadable `step` to <step>.corrupt (<step>.corrupt.N if taken) on process
    0, with one warning line, and makes every process's manager forget it (orbax ignores
    such names)."""
    directory = paths.path(manager.directory)
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


def _free_name(path: paths.Path) -> paths.Path:
    """`path`, or path.1, path.2, ... : the first that does not exist."""
    n = 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate
