"""diffusion_jax against the PyTorch peer on the same machine, in one run: the processes take
turns, round after round, so that both see the same load, and the summary gives medians.

Per round: training images/s of the CIFAR-10 recipe (`train_step.py` against
`torch_peer.py --only_train`), and a whole 20-step DDIM sampling process of 32 images timed
from outside, start to exit (`sampling.py --whole_process` against
`torch_peer.py --only_sample`); the JAX process runs twice, with an empty persistent
compilation cache ("cold") and with the cache the previous run left ("warm"). The user's
command, `diffusion-jax --mode=sample` of a CIFAR-10 workdir (restore the checkpoint, sample,
write the grid, the .npz and the reverse process), is timed the same way ("sample job").

    PYTHONPATH=. python benchmarks/peer_comparison.py --peer_python=/tmp/peer/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_process(argv: list[str], env: dict) -> tuple[float, list[dict]]:
    """Wall seconds of the process and the JSON lines it printed."""
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[1]} exited with {result.returncode}:\n{result.stderr[-2000:]}")
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    return seconds, lines


# Not common.emit: this process must not import JAX, which on a GPU would take the memory
# that the measured processes need.
def emit(**fields) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}))
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer_python", required=True, help="a Python with torch + diffusers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only_sampling", action="store_true", help="skip the training rounds")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample_batch", type=int, default=32)
    parser.add_argument("--sample_steps", type=int, default=20)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=ROOT)
    train_args = [f"--batch={args.batch}", f"--steps={args.steps}"]
    sample_args = [f"--batch={args.sample_batch}", f"--steps={args.sample_steps}"]
    peer_sample_args = [
        f"--sample_batch={args.sample_batch}",
        f"--sample_steps={args.sample_steps}",
    ]
    results: dict[str, list[float]] = {}

    def record(name, value, **extra):
        results.setdefault(name, []).append(value)
        emit(benchmark=name, value=value, **extra)

    with tempfile.TemporaryDirectory() as cache_root:
        workdir = os.path.join(cache_root, "cifar10")
        run_process(  # a checkpoint to sample from: one step of the recipe on synthetic data
            [sys.executable, "-m", "diffusion_jax", "--config=configs/cifar10.py"]
            + [f"--workdir={workdir}", "--config.data.dataset=synthetic"]
            + ["--config.training.num_steps=1", "--config.training.batch_size=2"]
            + ["--config.sampling.num_steps=2", "--config.sampling.num_samples=2"],
            dict(env, JAX_COMPILATION_CACHE_DIR=os.path.join(cache_root, "setup")),
        )
        sample_job = [sys.executable, "-m", "diffusion_jax", "--config=configs/cifar10.py"]
        sample_job += [f"--workdir={workdir}", "--mode=sample"]
        sample_job += [
            "--config.sampling.sampler=ddim",
            f"--config.sampling.num_steps={args.sample_steps}",
        ]
        sample_job += [f"--config.sampling.num_samples={args.sample_batch}"]
        for round_index in range(args.rounds):
            if not args.only_sampling:
                _, lines = run_process(
                    [sys.executable, "benchmarks/train_step.py", "--config=configs/cifar10.py"]
                    + train_args,
                    env,
                )
                record("jax_train_images_per_sec", lines[-1]["images_per_sec"], round=round_index)
                _, lines = run_process(
                    [args.peer_python, "benchmarks/torch_peer.py", "--only_train"] + train_args, env
                )
                record("torch_train_images_per_sec", lines[-1]["images_per_sec"], round=round_index)

            cache = os.path.join(cache_root, f"round{round_index}")
            cache_env = dict(env, JAX_COMPILATION_CACHE_DIR=cache)
            for temperature in ("cold", "warm"):
                seconds, _ = run_process(
                    [sys.executable, "benchmarks/sampling.py", "--whole_process"] + sample_args,
                    cache_env,
                )
                record(f"jax_sample_process_seconds_{temperature}", seconds, round=round_index)
            job_env = dict(env, JAX_COMPILATION_CACHE_DIR=cache + "_job")
            for temperature in ("cold", "warm"):
                seconds, _ = run_process(sample_job, job_env)
                record(f"jax_sample_job_seconds_{temperature}", seconds, round=round_index)
            seconds, _ = run_process(
                [args.peer_python, "benchmarks/torch_peer.py", "--only_sample"] + peer_sample_args,
                env,
            )
            record("torch_sample_process_seconds", seconds, round=round_index)

    medians = {name: statistics.median(values) for name, values in results.items()}
    train_ratio = {}
    if not args.only_sampling:
        train_ratio["train_speed_ratio_jax_over_torch"] = (
            medians["jax_train_images_per_sec"] / medians["torch_train_images_per_sec"]
        )
    emit(
        benchmark="peer_comparison_summary",
        rounds=args.rounds,
        **medians,
        **train_ratio,
        sample_time_ratio_jax_cold_over_torch=medians["jax_sample_process_seconds_cold"]
        / medians["torch_sample_process_seconds"],
        sample_time_ratio_jax_warm_over_torch=medians["jax_sample_process_seconds_warm"]
        / medians["torch_sample_process_seconds"],
        sample_job_ratio_cold_over_torch=medians["jax_sample_job_seconds_cold"]
        / medians["torch_sample_process_seconds"],
        sample_job_ratio_warm_over_torch=medians["jax_sample_job_seconds_warm"]
        / medians["torch_sample_process_seconds"],
    )


if __name__ == "__main__":
    main()
