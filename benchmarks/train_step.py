"""Training throughput, compile time, memory and MFU of the train step, and the cost of each
knob against the default in the same run. One JSON line per measurement.

    python benchmarks/train_step.py --config=configs/cifar10.py --batch=16 --steps=5
    python benchmarks/train_step.py --config=configs/cifar10.py --batch=16 \
        --knobs=bfloat16,remat,einsum,grad_accum
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py \
        --config=configs/digits.py --batch=64 --knobs=fsdp,tensor
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import jax

from benchmarks.common import device_peak, emit, random_batch, time_calls
from diffusion_jax import parallel
from diffusion_jax.run import run_keys, setup_run

KNOBS = {
    "default": {},
    "bfloat16": {"model.dtype": "bfloat16"},
    "remat": {"model.remat": True},
    "einsum": {"model.attention": "einsum"},
    "grad_accum": {"training.grad_accum": 2},
    "fsdp": {"mesh.data": -1, "mesh.fsdp": 2},
    "data_parallel": {"mesh.data": -1, "mesh.fsdp": 1},
    "tensor": {"mesh.data": -1, "mesh.tensor": 2},
}


def load_config(path: str):
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def time_train_step(config, steps: int):
    """The compiled train step of `config` on a random batch already on the devices:
    (median seconds per step over `steps` after warm-up, compile seconds, compiled, run)."""
    init_key, train_key, _ = run_keys(config)
    run = setup_run(config, init_key)
    state, step = run.init_state(init_key), run.make_step()
    batch_size = config.training.batch_size
    batch = jax.device_put(random_batch(config, batch_size), parallel.batch_sharding(run.mesh))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, train_key).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch, train_key)
        jax.block_until_ready(metrics["loss"])

    median, _ = time_calls(one_step, steps)
    return median, compile_s, compiled, run


def measure(
    config, config_path: str, batch_size: int, steps: int, knob: str, peak: float, peak_kind: str
):
    config.training.batch_size = batch_size
    median, compile_s, compiled, run = time_train_step(config, steps)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = compiled.memory_analysis()
    per_device_flops = flops  # cost_analysis reports the per-device program
    emit(
        benchmark="train_step",
        config=config_path,
        knob=knob,
        model_params=sum(x.size for x in jax.tree.leaves(run.abstract_state.params)),
        image_size=config.data.image_size,
        batch=batch_size,
        mesh=dict(run.mesh.shape),
        steps_per_sec=1.0 / median,
        images_per_sec=batch_size / median,
        compile_seconds=compile_s,
        temp_gib_per_device=memory.temp_size_in_bytes / 2**30 if memory else None,
        state_gib_per_device=memory.argument_size_in_bytes / 2**30 if memory else None,
        flops_per_step_per_device=per_device_flops,
        mfu=per_device_flops / median / peak if per_device_flops else None,
        peak_flops=peak,
        peak_kind=peak_kind,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/cifar10.py")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--knobs", default="", help=f"comma-separated: {','.join(KNOBS)}")
    args = parser.parse_args()
    peak, peak_kind = device_peak()
    for knob in ["default"] + [k for k in args.knobs.split(",") if k]:
        config = load_config(args.config)
        config.mesh.data = -1
        for key, value in KNOBS[knob].items():
            section, field = key.split(".")
            config[section][field] = value
        measure(config, args.config, args.batch, args.steps, knob, peak, peak_kind)


if __name__ == "__main__":
    main()
