"""--mode=export: the EMA weights of a checkpoint as one file to share.

Writes <workdir>/export/ema_step_<N>.msgpack (the newest checkpoint, or
eval.checkpoint_step) with the run config beside it (.json); `--mode=eval|sample` read such
a file through eval.params_file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from diffusion_jax import config as config_lib
from diffusion_jax import export, parallel
from diffusion_jax.run import checkpoint_step_arg, restore_ema

log = logging.getLogger(__name__)


def export_ema(config, workdir) -> Path:
    """Writes the file of the module doc and returns its path."""
    config_lib.validate(config, jax.device_count())
    step, params, _ = restore_ema(config, workdir, checkpoint_step_arg(config))
    path = Path(workdir) / "export" / f"ema_step_{step}.msgpack"
    if parallel.is_main_process():
        export.save_params(path, params, config)
        log.info("export: wrote %s and %s", path, export.config_path(path).name)
    return path
