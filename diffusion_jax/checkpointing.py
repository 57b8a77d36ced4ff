"""Checkpoints with orbax: asynchronous saves of the whole TrainState and the data position,
keep-N, restore of the newest good step into whatever mesh the current run uses.

Layout: <workdir>/checkpoints/<step>/{state,meta}. Orbax writes each step into a temporary
directory and renames it (or, on object stores, writes a commit marker) when all hosts are
done, so a run killed mid-save leaves the previous step as the newest complete one; a step
that is present but unreadable is skipped with a warning naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from diffusion_jax.config import ConfigError

log = logging.getLogger(__name__)


def checkpoint_dir(workdir) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(
    workdir, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


def save(manager: ocp.CheckpointManager, step: int, state, meta: dict, *, force=False) -> bool:
    """Starts an asynchronous save of `state` (any sharding; every host writes its shards)
    and `meta` (JSON) at `step`; training goes on while it is written."""
    saved = manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )
    if saved:
        log.info("checkpoint: saving step %d to %s", step, manager.directory)
    return saved


def _restore_args(abstract):
    return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)


def check_shapes(manager: ocp.CheckpointManager, step: int, abstract_params) -> None:
    """Fails with one line naming the first parameter whose stored shape differs."""
    stored = manager.item_metadata(step)["state"]["params"]
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
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract_state, restore_args=_restore_args(abstract_state)
            ),
            meta=ocp.args.JsonRestore(),
        ),
    )
    log.info("checkpoint: restored step %d from %s", step, manager.directory)
    return restored.state, restored.meta


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """(step, state, meta) of the newest readable checkpoint, or (None, None, None).

    A checkpoint that cannot be read (truncated by a kill during a non-atomic write) is
    skipped with a warning naming it, and the one before it is used. A checkpoint of a
    different model config is an error, not something to skip.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, meta = restore(manager, step, abstract_state)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
            log.warning(
                "checkpoint %s is unreadable (%s: %s); using the previous one",
                Path(manager.directory) / str(step),
                type(e).__name__,
                str(e).splitlines()[0][:200],
            )
            continue
        return step, state, meta
    return None, None, None


def restore_ema(manager: ocp.CheckpointManager, step: int, abstract_params):
    """Only the EMA parameters of `step` (no optimizer state is read), placed like
    `abstract_params`."""
    check_shapes(manager, step, abstract_params)
    item = {"ema_params": abstract_params}
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=_restore_args(item), partial_restore=True
            )
        ),
    )
    log.info("checkpoint: restored the EMA parameters of step %d", step)
    return restored.state["ema_params"]


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
