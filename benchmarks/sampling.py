"""Sampling throughput: images/s per denoising step and for a whole DDIM run, compile time of
the sampler, the forward pass alone, and the scan-based sampler against a Python loop of
jitted steps. One JSON line per measurement.

    python benchmarks/sampling.py --config=configs/cifar10.py --batch=32 --steps=20
    python benchmarks/sampling.py --whole_process   # only: import, init, compile, sample once

`--whole_process` is the process to time from outside against the PyTorch peer's
`torch_peer.py --only_sample` (see `peer_comparison.py`); it uses the persistent compilation
cache as the command line does, so a repeated run skips the compile.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import emit, time_calls
from benchmarks.train_step import load_config
from diffusion_jax import diffusion as dm
from diffusion_jax import generation, parallel
from diffusion_jax.run import run_keys, setup_run


def main():
    process_start = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/cifar10.py")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole_process", action="store_true")
    args = parser.parse_args()
    report = functools.partial(emit, config=args.config)
    config = load_config(args.config)
    config.sampling.sampler, config.sampling.num_steps = "ddim", args.steps
    config.mesh.data = -1
    if args.whole_process:
        parallel.enable_compilation_cache()
    init_key, _, key = run_keys(config)
    run = setup_run(config, init_key)
    params = run.init_state(init_key).ema_params
    fn = generation.make_sample_fn(run.model, run.sched, config, run.mesh)
    if args.whole_process:
        images = np.asarray(fn(params, key, None, args.batch))
        report(
            benchmark="sample_ddim_whole_process",
            batch=args.batch,
            steps=args.steps,
            seconds=time.perf_counter() - process_start,
            finite=bool(np.isfinite(images).all()),
            note="in-process time from the first line of main; time the process from outside",
        )
        return

    t0 = time.perf_counter()
    fn(params, key, None, args.batch).block_until_ready()
    first_call = time.perf_counter() - t0
    median, _ = time_calls(
        lambda: fn(params, key, None, args.batch).block_until_ready(), args.repeats, warmup=0
    )
    report(
        benchmark="sample_ddim_scan",
        batch=args.batch,
        steps=args.steps,
        seconds=median,
        images_per_sec=args.batch / median,
        images_per_sec_per_step=args.batch * args.steps / median,
        compile_seconds=first_call - median,
    )

    # The denoiser alone, for the "sampling within 1.5x of the forward pass" comparison.
    d = config.data
    x = jnp.zeros((args.batch, d.image_size, d.image_size, d.channels))
    t = jnp.zeros((args.batch,), jnp.int32)
    forward = jax.jit(lambda p, x, t: run.model.apply({"params": p}, x, t))
    f_median, _ = time_calls(lambda: forward(params, x, t).block_until_ready(), args.repeats)
    report(
        benchmark="forward_pass",
        batch=args.batch,
        seconds=f_median,
        sampling_step_over_forward=(median / args.steps) / f_median,
    )

    # A Python loop of jitted DDIM steps, the shape of most PyTorch samplers.
    timesteps = dm.respaced_timesteps(config.diffusion.num_timesteps, args.steps)
    abar = run.sched.alphas_cumprod

    @jax.jit
    def ddim_step(p, x, t, t_next):
        eps = run.model.apply({"params": p}, x, jnp.full((x.shape[0],), t))
        a, a_next = abar[t], jnp.where(t_next >= 0, abar[jnp.maximum(t_next, 0)], 1.0)
        x0 = jnp.clip((x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a), -1, 1)
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
        return jnp.sqrt(a_next) * x0 + jnp.sqrt(1 - a_next) * eps

    def python_loop():
        x = jax.random.normal(key, (args.batch, d.image_size, d.image_size, d.channels))
        nexts = list(timesteps[1:]) + [-1]
        for t_i, t_n in zip(timesteps, nexts, strict=True):
            x = ddim_step(params, x, int(t_i), int(t_n))
        x.block_until_ready()

    loop_median, _ = time_calls(python_loop, args.repeats, warmup=1)
    report(
        benchmark="sample_ddim_python_loop",
        batch=args.batch,
        steps=args.steps,
        seconds=loop_median,
        images_per_sec=args.batch / loop_median,
    )
    report(
        benchmark="sampling_benchmark_process",
        seconds=time.perf_counter() - process_start,
        note="this script with every measurement above; --whole_process is the comparable run",
    )


if __name__ == "__main__":
    main()
