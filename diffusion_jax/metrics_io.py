"""What people look at: metrics as JSON lines and TensorBoard scalars, progress with it/s and
ETA, image grids and curves as PNG. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends one JSON object per call to `metrics.jsonl` and writes TensorBoard scalars.

    Every line is JSON (a non-finite value is written as null), and a resumed run first drops
    the rows after the step it resumes from (`resume_step`): a run killed after logging
    past its last checkpoint logs those steps again, and the file keeps one row per step.
    """

    def __init__(
        self,
        workdir,
        filename: str = "metrics.jsonl",
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / filename
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_rows(self.path, resume_step)
            if tensorboard:
                from tensorboardX import SummaryWriter

                # TensorBoard hides the events of the steps logged again, as the file drops them.
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_rows(path: Path, last_step: int) -> None:
    """Keeps the rows of `path` up to `last_step`, one per step (the last one written), in
    step order; drops any line that is not JSON (a kill mid-write). The new file replaces
    the old one at once, so a kill now loses nothing."""
    if not path.exists():
        return
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            rows[row["step"]] = row
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(rows[s], allow_nan=False) + "\n" for s in sorted(rows)))
    os.replace(tmp, path)


def _to_python(value):
    """A number, or nested lists of numbers, as JSON holds them: NaN and infinities become
    None (null), since JSON has no such numbers."""
    value = np.asarray(value)
    if value.ndim:
        return [_to_python(v) for v in value]
    value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Rate and ETA of a loop over `total` items, reported as one log line.

    The rate counts only the loop's own work: time spent inside `paused()` (checkpoints,
    pictures, evaluations) is left out, and so are the items before `begin` (the first step
    of a run, which pays for warming up). The ETA adds the paused time seen so far per item,
    so that it stays the time to the end of the loop.
    """

    def __init__(self, total: int, start: int = 0, unit: str = "it", clock=time.perf_counter):
        self.total, self.unit, self._clock = total, unit, clock
        self._paused = 0.0
        self.begin(start)

    def begin(self, done: int) -> None:
        """Counts from now and `done` items on."""
        self._start = self._clock()
        self._last_t, self._n0, self._last_n = self._busy(), done, done

    @contextmanager
    def paused(self):
        """Time inside is not the loop's: it does not count in the rate."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - t0

    def _busy(self) -> float:
        return self._clock() - self._paused

    def update(self, done: int) -> dict:
        """Figures since the last update: rate (items/s; NaN when no item was timed) and ETA
        (s; the wall time per item since `begin`, pauses included, times the items left)."""
        now = self._busy()
        rate = (done - self._last_n) / max(now - self._last_t, 1e-9)
        self._last_t, self._last_n = now, done
        counted = done - self._n0
        if counted <= 0:
            return {"rate": float("nan"), "eta": float("inf")}
        eta = (self.total - done) * (self._clock() - self._start) / counted
        return {"rate": rate, "eta": eta}

    def line(self, done: int, figures: dict) -> str:
        pct = 100.0 * done / max(self.total, 1)
        rate = figures["rate"]
        rate = f"{rate:.2f}" if math.isfinite(rate) else "?"
        return (
            f"{done}/{self.total} ({pct:.0f}%) {rate} {self.unit}/s "
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


def save_grid(path, images, rows: int | None = None, min_size: int = 512) -> None:
    """Writes images in [-1, 1] as a PNG grid, enlarged (nearest neighbour, by a whole
    factor) to at least `min_size` pixels wide, so that small images can be read."""
    if jax.process_index() != 0:
        return
    grid = image_grid(to_uint8(images), rows)
    scale = max(1, -(-min_size // grid.shape[1]))
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    log.info("wrote %s", path)


def plot_curves(path, series: dict, *, xlabel: str, title: str = "", log_x: bool = False):
    """A PNG of one line per entry of `series` ({label: [(x, y), ...]}), with markers; on a
    log x axis when `log_x`. Only process 0 writes."""
    if jax.process_index() != 0:
        return
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, points in series.items():
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    log.info("wrote %s", path)
