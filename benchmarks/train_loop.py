"""How a training step's wall time splits into compute, data and host overhead.

Three measurements of the same config on the same devices, one JSON line each and a summary:
- compute: the compiled train step alone, on a batch already on the devices;
- data: the training input pipeline alone (`next()` on the iterator the loop uses, batches
  placed on the devices);
- loop: the real `train_and_evaluate` (logging, metrics fetched one step late, checkpoint
  and samples only at the end), its steps/s read back from metrics.jsonl after the first
  logging interval.
Host overhead is what the loop spends per step beyond the compute.

    PYTHONPATH=. python benchmarks/train_loop.py --config=configs/digits.py --steps=300
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.common import emit
from benchmarks.train_step import load_config, time_train_step
from diffusion_jax import parallel
from diffusion_jax.data import pipeline
from diffusion_jax.jobs import train as train_job


def data_seconds(config, batches: int) -> float:
    iterator = pipeline.create_iterator(
        config,
        parallel.make_mesh(config),
        split=config.data.train_split,
        global_batch=config.training.batch_size,
    )
    for _ in range(5):
        jax.block_until_ready(next(iterator))
    t0 = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(iterator))
    return (time.perf_counter() - t0) / batches


def loop_seconds(config, steps: int, log_every: int) -> float:
    t = config.training
    t.num_steps, t.log_every = steps, log_every
    t.sample_every = t.ckpt_every = steps
    t.eval_every = 0
    config.sampling.num_steps = 2
    with tempfile.TemporaryDirectory() as workdir:
        train_job.train_and_evaluate(config, workdir)
        lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(x)["steps_per_sec"] for x in lines if '"steps_per_sec"' in x]
    return 1.0 / statistics.median(rates[1:])  # the first interval includes the warm-up


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--batch", type=int, default=0, help="0: the config's batch size")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log_every", type=int, default=50)
    args = parser.parse_args()

    def config():
        c = load_config(args.config)
        c.training.batch_size = args.batch or c.training.batch_size
        return c

    batch = config().training.batch_size
    compute = time_train_step(config(), steps=20)[0]
    emit(benchmark="step_compute", batch=batch, seconds=compute)
    data = data_seconds(config(), batches=50)
    emit(benchmark="step_data", batch=batch, seconds=data)
    in_loop = loop_seconds(config(), args.steps, args.log_every)
    emit(benchmark="step_in_training_loop", batch=batch, seconds=in_loop)
    emit(
        benchmark="step_time_split",
        config=args.config,
        batch=batch,
        loop_seconds=in_loop,
        compute_fraction=compute / in_loop,
        data_fraction_if_serial=data / in_loop,
        host_overhead_fraction=max(in_loop - compute, 0.0) / in_loop,
    )


if __name__ == "__main__":
    main()
