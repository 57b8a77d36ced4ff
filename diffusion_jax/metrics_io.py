"""What people look at: metrics as JSON lines and TensorBoard scalars, progress with it/s and
ETA, image grids and curves as PNG. Only process 0 writes."""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import tempfile
import time
from contextlib import contextmanager

import jax
import numpy as np
from PIL import Image

from diffusion_jax import paths

log = logging.getLogger(__name__)


class MetricWriter:
    """Appends one JSON object per call to `metrics.jsonl` and writes TensorBoard scalars.

    Every line is JSON (a non-finite value is written as null), and a resumed run first drops
    the rows after the step it resumes from (`resume_step`): a run killed after logging
    past its last checkpoint logs those steps again, and the file keeps one row per step.

    In a bucket, which has no append, the file is kept in memory and written whole at most
    every `remote_every` seconds, at `flush` (before each checkpoint) and at `close`; a
    failed upload is a warning, retried at the next one, not the end of the run.
    TensorBoard's event file is written locally and uploaded likewise (`_RemoteEvents`).
    `filename=None` writes TensorBoard alone (`add`: evaluations, pictures).
    """

    def __init__(
        self,
        workdir,
        filename: str | None = "metrics.jsonl",
        tensorboard: bool = True,
        resume_step: int | None = None,
        remote_every: float = 10.0,
        clock=time.monotonic,
    ):
        self.enabled = jax.process_index() == 0
        self.path = paths.path(workdir) / filename if filename else None
        self._remote = paths.is_remote(workdir)
        self._text = None  # the whole file, for a bucket
        self._remote_every, self._clock = remote_every, clock
        self._flushed_at, self._unflushed = clock(), False
        self._tb = self._events = None
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_rows(self.path, resume_step)
            if self._remote:
                self._text = self.path.read_text() if self.path.exists() else ""
        if self.enabled:
            if tensorboard:
                from tensorboardX import SummaryWriter

                board = paths.path(workdir) / "tensorboard"
                if self._remote:
                    self._events = _RemoteEvents(board)
                # TensorBoard hides the events of the steps logged again, as the file drops them.
                purge = None if resume_step is None else resume_step + 1
                local_board = self._events.local if self._events else board
                self._tb = SummaryWriter(str(local_board), purge_step=purge)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        line = json.dumps(row, allow_nan=False) + "\n"
        if self._remote:
            self._text += line
            self._unflushed = True
            if self._clock() - self._flushed_at >= self._remote_every:
                self.flush()
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()
            if self._events:
                self._events.upload()

    def add(self, step: int, scalars: dict | None = None, images: dict | None = None) -> None:
        """TensorBoard alone: scalars {tag: number} and images {tag: PNG file} at `step`."""
        if self._tb is None:
            return
        for tag, value in (scalars or {}).items():
            if isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(tag, value, int(step))
        for tag, png in (images or {}).items():
            with Image.open(io.BytesIO(paths.path(png).read_bytes())) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._tb.add_image(tag, pixels, int(step), dataformats="HWC")
        self._tb.flush()
        if self._events:
            self._events.upload()

    def flush(self) -> None:
        """Writes what a bucket does not hold yet (nothing to do on a local disk)."""
        if not (self.enabled and self._remote and self._unflushed and self.path is not None):
            return
        self._flushed_at = self._clock()
        try:
            paths.write_text(self.path, self._text)
            self._unflushed = False
        except Exception as e:  # noqa: BLE001 - the rows stay in memory for the next try
            log.warning("could not write %s (%s); trying again later", self.path, e)

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
            if self._events:
                self._events.upload(force=True)
                self._events.cleanup()


class _RemoteEvents:
    """TensorBoard events for a bucket: written to a local folder by tensorboardX (whose own
    GCS writer is broken) and uploaded whole, at most every `every` seconds and at close.
    Each run writes its own event file, so an upload never overwrites another run's."""

    def __init__(self, remote, every: float = 30.0, clock=time.monotonic):
        self.remote, self.every, self._clock = remote, every, clock
        self.local = tempfile.mkdtemp(prefix="diffusion_jax_tensorboard_")
        self._last = -float("inf")

    def upload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last < self.every:
            return
        self._last = now
        for name in sorted(p.name for p in paths.path(self.local).iterdir()):
            try:
                with open(f"{self.local}/{name}", "rb") as f:
                    paths.write_bytes(self.remote / name, f.read())
            except Exception as e:  # noqa: BLE001 - uploaded whole again at the next try
                log.warning("could not upload %s to %s (%s)", name, self.remote, e)

    def cleanup(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


def truncate_rows(path, last_step: int) -> None:
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
    paths.write_text(
        path, "".join(json.dumps(rows[s], allow_nan=False) + "\n" for s in sorted(rows))
    )


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


def samples_dir(workdir) -> paths.Path:
    """Where a run's pictures go: <workdir>/samples."""
    return paths.path(workdir) / "samples"


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
    paths.save_image(path, image)
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    paths.write_bytes(path, buffer.getvalue())
    log.info("wrote %s", path)
