"""Reading checkpoints into the current run's mesh: the whole state, the newest readable
step, only the EMA parameters or the meta item, with the checks that turn a checkpoint of
another model config into one line naming the parameter or the config field."""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp

from diffusion_jax.checkpointing.corrupt import first_readable
from diffusion_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _restore_args(abstract):
    """Orbax's restore arguments placing each array of `abstract` with its .sharding."""
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
        log.info("checkpoint: restored the EMA parameters of step %d (%s)", step, manager.directory)
        return restored.state["ema_params"]
    log.info(
        "checkpoint: restored power-function EMA %d of step %d (%s)",
        profile[0],
        step,
        manager.directory,
    )
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


def abstract_with_shardings(tree, shardings):
    """`tree` as jax.ShapeDtypeStructs (shape and dtype of each leaf) carrying the matching
    sharding of `shardings`: the target `restore` places arrays by."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
