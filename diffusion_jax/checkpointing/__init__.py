"""Checkpoints with orbax: asynchronous saves of the whole TrainState and the data position,
keep-N, restore of the newest good step into whatever mesh the current run uses.

Layout: <workdir>/checkpoints/<step>/{state,meta}. Orbax writes each step into a temporary
directory and renames it (or, on object stores, writes a commit marker) when all hosts are
done, so a run killed mid-save leaves the previous step as the newest complete one. A step
that is present but unreadable while an older one reads is moved aside to <step>.corrupt
with a warning naming it, so that no later job trips on it. A save that fails (permissions,
a full disk) ends the run with one line, `CheckpointError`, and leaves the earlier steps as
they were.

The modules, one job each (every name other modules use is re-exported here, so
`checkpointing.make_manager(...)` and the like are all a caller needs):

- `saving.py`: the folder layout (`checkpoint_dir`, `EMA_SNAPSHOTS`), `make_manager`,
  `save`, and `Saver`, the training run's writer, with the one-line reasons and advice of a
  failed save (`failure_reason`) and the abandoning of its partial folder.
- `restoring.py`: `restore`, `restore_latest`, `restore_ema`, `restore_meta`,
  `restore_tree`, the checks against another model config (`check_shapes`,
  `check_text_encoder`) and `abstract_with_shardings`.
- `corrupt.py`: `first_readable` and `move_aside`: unreadable steps renamed to
  <step>`CORRUPT_SUFFIX`.
- `orbax_compat.py`: every use of orbax's private or version-fragile behaviour (its
  `_src` modules, private attributes, log lines and folder names): `quiet_orbax` and the
  release of orbax's threads after a failed save, each doing nothing where orbax lacks it.
"""

from diffusion_jax.checkpointing.corrupt import CORRUPT_SUFFIX, first_readable, move_aside
from diffusion_jax.checkpointing.orbax_compat import quiet_orbax
from diffusion_jax.checkpointing.restoring import (
    abstract_with_shardings,
    check_shapes,
    check_text_encoder,
    restore,
    restore_ema,
    restore_latest,
    restore_meta,
    restore_tree,
)
from diffusion_jax.checkpointing.saving import (
    ABANDON_SECONDS,
    EMA_SNAPSHOTS,
    Saver,
    checkpoint_dir,
    failure_reason,
    make_manager,
    save,
)
from diffusion_jax.errors import CheckpointError

__all__ = [
    "ABANDON_SECONDS",
    "CORRUPT_SUFFIX",
    "EMA_SNAPSHOTS",
    "CheckpointError",
    "Saver",
    "abstract_with_shardings",
    "check_shapes",
    "check_text_encoder",
    "checkpoint_dir",
    "failure_reason",
    "first_readable",
    "make_manager",
    "move_aside",
    "quiet_orbax",
    "restore",
    "restore_ema",
    "restore_latest",
    "restore_meta",
    "restore_tree",
    "save",
]
