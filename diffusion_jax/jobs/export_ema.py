"""--mode=export: the EMA weights of a checkpoint to share.

eval.export_format="msgpack" (default) writes <workdir>/export/ema_step_<N>.msgpack (the
exponential EMA of the newest checkpoint, or eval.checkpoint_step), or
ema_sigma_rel_<w>_step_<N>.msgpack for the EMA of width eval.ema_sigma_rel, with the run
config beside it (.json);
`--mode=eval|sample` read such a file through eval.params_file. "diffusers" writes a run
fine-tuned from a pipeline folder (training.init_from) back as a pipeline folder,
<workdir>/export/diffusers_step_<N>/: the source folder with the EMA U-Net in unet/ (and
the EMA text encoder in text_encoder/ when training.train_text_encoder trained it), which
diffusers' StableDiffusionPipeline.from_pretrained loads and this package reads as
config.pretrained or training.init_from.
"""

from __future__ import annotations

import logging

import jax

from diffusion_jax import export, parallel, paths, weights
from diffusion_jax.models import convert
from diffusion_jax.run import run_keys, setup_run
from diffusion_jax.weights import checkpoint_step_arg, job_params

log = logging.getLogger(__name__)


def export_ema(config, workdir) -> paths.Path:
    """Writes the file or folder of the module doc and returns its path."""
    run = setup_run(config, run_keys(config)[0])
    step, params = job_params(config, workdir, run, checkpoint_step_arg(config))
    # Collective: every process gathers its shards, whatever the mesh; the main one writes.
    host = jax.tree.map(parallel.gather, params)
    if config.eval.export_format == "diffusers":
        stem = weights.ema_file_name(config, step).replace("ema_", "", 1)
        path = paths.path(workdir) / "export" / f"diffusers_{stem}"
        if parallel.is_main_process():
            source = paths.local(config.training.init_from)
            with paths.writable_folder(path) as folder:
                if config.training.train_text_encoder:
                    convert.to_pipeline(host["unet"], folder, source, host["text_encoder"])
                else:
                    convert.to_pipeline(host, folder, source)
            log.info("export: wrote the pipeline folder %s", path)
        return path
    path = paths.path(workdir) / "export" / f"{weights.ema_file_name(config, step)}.msgpack"
    if parallel.is_main_process():
        export.save_params(path, host, config, step)
        log.info(
            "export: wrote %s and %s: %s",
            path,
            export.config_path(path).name,
            weights.describe(config, step),
        )
    return path
