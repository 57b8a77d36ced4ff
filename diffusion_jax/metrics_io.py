"""What people look at: metrics as JSON lines and TensorBoard scalars, progress with it/s and
ETA, and image grids as PNG. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends one JSON object per call to `metrics.jsonl` and writes TensorBoard scalars."""

    def __init__(self, workdir, filename: str = "metrics.jsonl", tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / filename
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_python(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Rate and ETA of a loop over `total` items, reported as one log line."""

    def __init__(self, total: int, start: int = 0, unit: str = "it"):
        self.total, self.unit = total, unit
        self._t0, self._n0 = time.perf_counter(), start
        self._last_t, self._last_n = self._t0, start

    def update(self, done: int) -> dict:
        """Figures since the last update: rate (items/s) and ETA (s) at the overall rate."""
        now = time.perf_counter()
        rate = (done - self._last_n) / max(now - self._last_t, 1e-9)
        overall = (done - self._n0) / max(now - self._t0, 1e-9)
        self._last_t, self._last_n = now, done
        eta = (self.total - done) / overall if overall > 0 else float("inf")
        return {"rate": rate, "eta": eta}

    def line(self, done: int, figures: dict) -> str:
        pct = 100.0 * done / max(self.total, 1)
        return (
            f"{done}/{self.total} ({pct:.0f}%) {figures['rate']:.2f} {self.unit}/s "
            f"ETA {format_duration(figures['eta'])}"
        )


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 [0, 255] as saved PNGs hold them (round to nearest)."""
    images = np.asarray(images, np.float32)
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images_uint8) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], the range the models work in."""
    return np.asarray(images_uint8).astype(np.float32) / 127.5 - 1.0


def samples_dir(workdir) -> Path:
    """Where a run's pictures go: <workdir>/samples."""
    return Path(workdir) / "samples"


def image_grid(images_uint8: np.ndarray, rows: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image."""
    n, h, w, c = images_uint8.shape
    rows = rows or int(math.ceil(math.sqrt(n)))
    cols = int(math.ceil(n / rows))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images_uint8):
        r, col = divmod(i, cols)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = img
    return grid


def save_grid(path, images, rows: int | None = None, min_size: int = 256) -> None:
    """Writes images in [-1, 1] as a PNG grid, upscaled (nearest) to at least `min_size`."""
    if jax.process_index() != 0:
        return
    grid = image_grid(to_uint8(images), rows)
    scale = max(1, min_size // max(grid.shape[:2]))
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    log.info("wrote %s", path)
