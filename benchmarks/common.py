"""Shared pieces of the benchmarks: timing, device peaks, JSON output."""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np

from benchmarks.timing import time_calls

__all__ = ["PEAK_FLOPS", "device_peak", "emit", "random_batch", "time_calls"]

# Dense bf16 peak FLOP/s per chip (vendor figures), for model FLOP utilization.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on the default device: the CPU's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jax.numpy.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def device_peak() -> tuple[float, str]:
    kind = jax.devices()[0].device_kind
    if kind in PEAK_FLOPS:
        return PEAK_FLOPS[kind], "published bf16 peak"
    return measured_matmul_peak(), "measured float32 matmul"


def emit(**fields) -> None:
    fields.setdefault("jax", jax.__version__)
    fields.setdefault("device", jax.devices()[0].device_kind)
    fields.setdefault("num_devices", jax.device_count())
    print(
        json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in fields.items()}),
        flush=True,
    )


def random_batch(config, batch_size: int) -> dict:
    d = config.data
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(-1, 1, (batch_size, d.image_size, d.image_size, d.channels)).astype(
            np.float32
        ),
        "label": rng.integers(0, max(d.num_classes, 1), batch_size).astype(np.int32),
    }
