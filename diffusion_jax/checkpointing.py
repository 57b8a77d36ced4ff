"""Checkpoints with orbax: asynchronous saves of the whole TrainState and the data position,
keep-N, restore of the newest good step into whatever sharding the current run uses.

Layout: <workdir>/checkpoints/<step>/{state,meta}. Orbax writes each step into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous step
as the newest good one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def checkpoint_dir(workdir) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(workdir, *, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                               save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, *, force=False) -> bool:
    """Starts an asynchronous save of `state` (any sharding) and `meta` (JSON) at `step`."""
    saved = manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )
    if saved:
        log.info("checkpoint: saving step %d to %s", step, manager.directory)
    return saved


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    return manager.latest_step()


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(state, meta) of `step`, each array placed with the sharding in `abstract_state` (a
    pytree of jax.ShapeDtypeStruct with .sharding), so any mesh can restore any checkpoint."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
    )
    log.info("checkpoint: restored step %d from %s", step, manager.directory)
    return restored.state, restored.meta


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
