"""Before anything compiles or is written: the run config resolved once, then everything the
run needs checked, each problem one line naming the field or path and the fix.

    resolve.py    (config, workdir, mode) -> the run config every job takes: pipeline folder
                  merged, latents located, scheduler conventions read, validated
    checks.py     check(config, workdir, mode): the first problem of this job, in order
    workdir.py    the workdir: writable with room for checkpoints, or holding what a job reads
    files.py      the files the config names and its data: present, readable, of their format
    resumable.py  a workdir's config.json against the config that would resume or read it

main.py calls `resolve` and then `check`; nothing here writes.
"""

from diffusion_jax.preflight.checks import check
from diffusion_jax.preflight.resolve import resolve
from diffusion_jax.preflight.resumable import check_resumable_config
from diffusion_jax.preflight.workdir import check_posthoc

__all__ = ["check", "check_posthoc", "check_resumable_config", "resolve"]
