"""Timing without any framework import, shared by the JAX benchmarks and the PyTorch peer."""

from __future__ import annotations

import statistics
import time


def time_calls(fn, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Median seconds of fn() (which must block) over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times
