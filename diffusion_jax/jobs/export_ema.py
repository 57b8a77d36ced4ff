"""--mode=export: the EMA weights of a checkpoint to share.

eval.export_format="msgpack" (default) writes <workdir>/export/ema_step_<N>.msgpack (the
newest checkpoint, or eval.checkpoint_step) with the run config beside it (.json);
`--mode=eval|sample` read such a file through eval.params_file. "diffusers" writes a run
fine-tuned from a pipeline folder (training.init_from) back as a pipeline folder,
<workdir>/export/diffusers_step_<N>/: the source folder with the EMA U-Net in unet/ (and
the EMA text encoder in text_encoder/ when training.train_text_encoder trained it), which
diffusers' StableDiffusionPipeline.from_pretrained loads and this package reads as
config.pretrained or training.init_from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from diffusion_jax import export, parallel, validation
from diffusion_jax.models import convert
from diffusion_jax.run import checkpoint_step_arg, restore_ema

log = logging.getLogger(__name__)


def export_ema(config, workdir) -> Path:
    """Writes the file or folder of the module doc and returns its path."""
    validation.validate(config, jax.device_count())
    step, params, _ = restore_ema(config, workdir, checkpoint_step_arg(config))
    # Collective: every process gathers its shards, whatever the mesh; the main one writes.
    host = jax.tree.map(parallel.gather, params)
    if config.eval.export_format == "diffusers":
        path = Path(workdir) / "export" / f"diffusers_step_{step}"
        if parallel.is_main_process():
            if config.training.train_text_encoder:
                convert.to_pipeline(
                    host["unet"], path, config.training.init_from, host["text_encoder"]
                )
            else:
                convert.to_pipeline(host, path, config.training.init_from)
            log.info("export: wrote the pipeline folder %s", path)
        return path
    path = Path(workdir) / "export" / f"ema_step_{step}.msgpack"
    if parallel.is_main_process():
        export.save_params(path, host, config)
        log.info("export: wrote %s and %s", path, export.config_path(path).name)
    return path
