"""train_and_evaluate(config, workdir): the whole training run, top to bottom.

The run setup (`run.setup_run`) gives the mesh, the objective, the model and the sharded
state; this loop restores or creates the state, compiles the step, and on the way writes
metrics, the objective's pictures, checkpoints and (every training.eval_every steps)
evaluations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time

import jax

from diffusion_jax import checkpointing, errors, metrics_io, parallel, paths
from diffusion_jax import config as config_lib
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation.evaluate import evaluate_and_write
from diffusion_jax.jobs.encode import ensure_latents
from diffusion_jax.run import ema_gammas, run_keys, setup_run
from diffusion_jax.training import state as state_lib

log = logging.getLogger(__name__)


def open_snapshots(workdir, start: int) -> checkpointing.Saver:
    """The writer of <workdir>/ema_snapshots/, keeping every snapshot. Snapshots after the
    resumed step are a killed run's: they go, and are written again (identically)."""
    manager = checkpointing.make_manager(
        workdir, max_to_keep=None, folder=checkpointing.EMA_SNAPSHOTS
    )
    for stale in [s for s in manager.all_steps() if s > start]:
        manager.delete(stale)
    return checkpointing.Saver(manager)


def write_config(config, workdir) -> None:
    if parallel.is_main_process():
        paths.write_text(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")


GIB = 2**30


def compile_and_plan_memory(run, state, train_key):
    """Compiles the run's step ahead of time, logs its memory per device, and refuses a run
    that will not fit the device with the number and the knobs to turn (instead of an XLA
    OOM)."""
    config = run.config
    batch = run.objective.batch_spec(
        config, config.training.batch_size, parallel.batch_sharding(run.mesh)
    )
    t0 = time.perf_counter()
    compiled = run.make_step().lower(state, batch, train_key).compile()
    analysis = compiled.memory_analysis()
    if analysis is not None:
        needed = (
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes
            + analysis.temp_size_in_bytes
        )
        log.info(
            "train step: compiled in %.1fs; %.1f MiB per device (%.1f MiB state and "
            "batch, %.1f MiB temporaries) on mesh %s",
            time.perf_counter() - t0,
            needed / 2**20,
            analysis.argument_size_in_bytes / 2**20,
            analysis.temp_size_in_bytes / 2**20,
            parallel.describe(run.mesh),
        )
        device = jax.local_devices()[0]
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit and needed > limit:
            raise errors.ConfigError(
                f"config.training.batch_size: the train step needs {needed / GIB:.2f} GiB per "
                f"device on mesh {parallel.describe(run.mesh)} but {device.device_kind} has "
                f"{limit / GIB:.2f} GiB; "
                "lower training.batch_size, raise training.grad_accum, mesh.fsdp or "
                "mesh.tensor, or set model.remat=True / model.dtype=bfloat16"
            )
    return compiled


class Preemption:
    """When to checkpoint and stop because the job is being preempted or interrupted.

    One process: SIGTERM or SIGINT (Ctrl-C) sets a flag, read after the next step; the same
    signal again aborts at once (its default action), for a save that takes too long.
    Several processes: JAX's preemption service (started by jax.distributed) catches the
    notice on any host and `reached_preemption_sync_point` answers True on every host at the
    same step, so all of them save that step together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = None  # set when the run should stop
        self._previous = {}
        self._multi = jax.process_count() > 1

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self):
        if self._multi:
            return self
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        log.warning(
            "%s: saving a checkpoint and stopping (%s again aborts at once)",
            name,
            "Ctrl-C" if signum == signal.SIGINT else name,
        )
        self.signal_name = self.signal_name or name
        signal.signal(signum, signal.SIG_DFL)

    def check(self, step: int) -> bool:
        """True (on every process at once) when the run should checkpoint and stop."""
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                log.warning("preemption notice: saving a checkpoint at step %d and stopping", step)
                self.signal_name = "SIGTERM"  # what the notice is, delivered by the service
        return self.requested

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train_and_evaluate(config, workdir) -> state_lib.TrainState:
    """Trains to config.training.num_steps, resuming from the newest checkpoint in workdir.

    On the way: metrics.jsonl + TensorBoard every log_every steps, an EMA sample grid
    samples/step_<N>.png every sample_every steps, a checkpoint every ckpt_every steps, and
    all three at the end. Returns the final state.

    Raises `Stopped` after SIGINT or SIGTERM, once a checkpoint of the current step is
    written, and `errors.CheckpointError` (one line) when a checkpoint cannot be
    written; the checkpoints before it are intact either way.
    """
    workdir = paths.path(workdir)
    t_cfg = config.training
    if config_lib.is_latent(config):
        ensure_latents(config, workdir)

    # Mesh, model and the abstract sharded state.
    init_key, train_key, sample_key = run_keys(config)
    run = setup_run(config, init_key)
    mesh = run.mesh
    parallel.log_topology(mesh, t_cfg.batch_size)

    # The state, created or restored already sharded: no host holds all of it.
    manager = checkpointing.make_manager(workdir, max_to_keep=t_cfg.max_to_keep)
    _, state, _ = checkpointing.restore_latest(manager, run.abstract_state)
    if state is None:
        state = run.init_state(init_key)
    write_config(config, workdir)
    start = int(state.step)
    num_params = sum(x.size for x in jax.tree.leaves(run.abstract_state.params))
    log.info(
        "model: %s parameters; training steps %d -> %d", f"{num_params:,}", start, t_cfg.num_steps
    )

    train_step = compile_and_plan_memory(run, state, train_key)
    batches = pipeline.create_iterator(
        config,
        mesh,
        split=config.data.train_split,
        global_batch=t_cfg.batch_size,
        start_step=start,
    )
    # One row per step in metrics.jsonl: the rows a killed run logged after `start` go.
    writer = metrics_io.MetricWriter(workdir, resume_step=start)
    saver = checkpointing.Saver(manager)
    snapshots = open_snapshots(workdir, start) if t_cfg.ema_snapshot_every else None
    config_json = config.to_json_best_effort()
    progress = metrics_io.Progress(t_cfg.num_steps, start, unit="steps")

    def save(step):
        writer.flush()  # the rows up to a checkpoint are kept whatever happens next
        meta = {"data_position": step, "step": step, "config": json.loads(config_json)}
        saver.save(step, state, meta)

    def save_snapshot(step):
        meta = {
            "step": step,
            "t": int(state.num_updates),
            "sigma_rels": list(config.optim.ema_sigma_rels),
            "gammas": list(ema_gammas(config)),
        }
        snapshots.save(step, state.power_emas, meta)

    @contextlib.contextmanager
    def off_the_clock():
        """Work that is not training (pictures, checkpoints, evaluations): the steps queued
        on the device before it count as training, its own time does not."""
        jax.block_until_ready(state)
        with progress.paused():
            yield

    def report(step, metrics):
        """Writes one logged step. Called one step late, so that fetching these scalars
        from the device overlaps the next step instead of stalling the loop."""
        scalars = jax.device_get(metrics)
        figures = progress.update(step)  # the step is done: its time is known
        scalars.pop("skipped")
        consecutive = int(scalars.pop("consecutive_skips"))
        writer.write(
            step,
            {
                **scalars,
                "steps_per_sec": figures["rate"],
                "images_per_sec": figures["rate"] * t_cfg.batch_size,
            },
        )
        log.info(
            "step %s | loss %.4f | grad norm %.3f | skipped %d",
            progress.line(step, figures),
            scalars["loss"],
            scalars["grad_norm"],
            scalars["skipped_steps"],
        )
        if consecutive >= t_cfg.max_consecutive_nonfinite:
            saver.wait()
            raise errors.NonFiniteError(
                f"{consecutive} consecutive steps had a non-finite loss or gradient (up to step "
                f"{step}); the last checkpoint is intact. Lower optim.lr, check the data, or "
                "raise training.max_consecutive_nonfinite"
            )

    def due(step, every):
        return bool(every) and step % every == 0

    step = start
    pending = None  # (step, metrics) of the last logged step, not yet fetched
    stopping = False
    with Preemption() as preemption, contextlib.closing(writer):
        while step < t_cfg.num_steps:
            state, metrics = train_step(state, next(batches), train_key)
            step += 1
            if step == start + 1:
                # The first step warms up (allocations, the input pipeline's threads); the
                # rate counts from its end.
                jax.block_until_ready(metrics)
                progress.begin(step)
            if pending is not None:
                report(*pending)
                pending = None
            saver.poll()
            stopping = preemption.check(step)
            last = step == t_cfg.num_steps
            if due(step, t_cfg.log_every) or last or stopping:
                pending = (step, metrics)
            if stopping:  # no picture or evaluation: a preempted machine has no time for them
                break
            picture = due(step, t_cfg.sample_every) or last
            checkpoint = due(step, t_cfg.ckpt_every) or last
            evaluation = due(step, t_cfg.eval_every)
            snapshot = snapshots is not None and (due(step, t_cfg.ema_snapshot_every) or last)
            if snapshots is not None:
                snapshots.poll()
            if picture or checkpoint or evaluation or snapshot:
                with off_the_clock():
                    if snapshot:
                        save_snapshot(step)
                    if picture:
                        key = jax.random.fold_in(sample_key, step)
                        png = run.objective.picture(run, state.ema_params, key, workdir, step)
                        writer.add(step, images={"samples": png} if png else None)
                    if checkpoint:
                        save(step)
                    if evaluation:
                        evaluate_and_write(
                            config, workdir, step, state.ema_params, run, board=writer
                        )
        if pending is not None:
            report(*pending)
        if stopping:
            save(step)
        # Still inside: a second signal while the last save is written aborts at once.
        t0 = time.perf_counter()
        saver.close()
        if snapshots is not None:
            snapshots.close()
    log.info("checkpoints written (waited %.1fs)", time.perf_counter() - t0)
    if preemption.requested:
        raise errors.Stopped(preemption.signal_name, step)
    return state
