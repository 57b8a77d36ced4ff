"""train_and_evaluate(config, workdir): the whole training run, top to bottom.

The run setup (`run.setup_run`) gives the mesh, the objective, the model and the sharded
state; this loop restores or creates the state, compiles the step, and on the way writes
metrics, the objective's pictures, checkpoints and (every training.eval_every steps)
evaluations.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

import jax

from diffusion_jax import checkpointing, metrics_io, parallel
from diffusion_jax import config as config_lib
from diffusion_jax.data import latents, pipeline
from diffusion_jax.encode import encode_dataset
from diffusion_jax.evaluation.evaluate import evaluate_and_write
from diffusion_jax.run import run_keys, setup_run
from diffusion_jax.training import state as state_lib

log = logging.getLogger(__name__)

# Fields that define what a checkpoint holds; a resumed run must agree on them.
STRUCTURAL_SECTIONS = ("model", "diffusion")


class NonFiniteError(RuntimeError):
    pass


def check_resumable_config(config, workdir: Path) -> None:
    """Refuses to resume a workdir whose config.json differs on model or diffusion fields."""
    path = workdir / "config.json"
    if not path.exists() or config.training.allow_config_change:
        return
    old = json.loads(path.read_text())
    new = json.loads(config.to_json_best_effort())
    for section in STRUCTURAL_SECTIONS:
        for key, value in new[section].items():
            if old.get(section, {}).get(key, value) != value:
                raise config_lib.ConfigError(
                    f"config.{section}.{key}: {value!r} differs from {old[section][key]!r} in "
                    f"{path}; use a new --workdir or pass "
                    "--config.training.allow_config_change=True"
                )


def write_config(config, workdir: Path) -> None:
    if parallel.is_main_process():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


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
            "batch, %.1f MiB temporaries)",
            time.perf_counter() - t0,
            needed / 2**20,
            analysis.argument_size_in_bytes / 2**20,
            analysis.temp_size_in_bytes / 2**20,
        )
        device = jax.local_devices()[0]
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if limit and needed > limit:
            raise config_lib.ConfigError(
                f"config.training.batch_size: the train step needs {needed / GIB:.2f} GiB per "
                f"device but {device.device_kind} has {limit / GIB:.2f} GiB; "
                "lower training.batch_size, raise training.grad_accum or mesh.fsdp, or set "
                "model.remat=True / model.dtype=bfloat16"
            )
    return compiled


class Preemption:
    """When to checkpoint and stop because the job is being preempted.

    One process: SIGTERM sets a flag, read at the next step. Several processes: JAX's
    preemption service (started by jax.distributed) catches the notice on any host and
    `reached_preemption_sync_point` answers True on every host at the same step, so all
    of them save that step together.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if self._multi:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def check(self, step: int) -> bool:
        """True (on every process at once) when the run should checkpoint and stop."""
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                log.warning("preemption notice: saving a checkpoint at step %d and stopping", step)
                self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir) -> state_lib.TrainState:
    """Trains to config.training.num_steps, resuming from the newest checkpoint in workdir.

    On the way: metrics.jsonl + TensorBoard every log_every steps, an EMA sample grid
    samples/step_<N>.png every sample_every steps, a checkpoint every ckpt_every steps, and
    all three at the end. Returns the final state.
    """
    workdir = Path(workdir)
    t_cfg = config.training
    config_lib.validate(config, jax.device_count())
    check_resumable_config(config, workdir)
    if config_lib.is_latent(config):
        config = latents.with_latents_dir(config, workdir)
        if not latents.latents_exist(config, config.data.train_split):
            log.info(
                "latents: none in %s yet; encoding the training split once", config.data.latents
            )
            encode_dataset(config, workdir)

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
    writer = metrics_io.MetricWriter(workdir)
    config_json = config.to_json_best_effort()
    progress = metrics_io.Progress(t_cfg.num_steps, start, unit="steps")

    def save(step):
        meta = {"data_position": step, "step": step, "config": json.loads(config_json)}
        checkpointing.save(manager, step, state, meta)

    def report(step, metrics, figures):
        """Writes one logged step. Called one step late, so that fetching these scalars
        from the device overlaps the next step instead of stalling the loop."""
        scalars = jax.device_get(metrics)
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
            manager.wait_until_finished()
            raise NonFiniteError(
                f"{consecutive} consecutive steps had a non-finite loss or gradient (up to step "
                f"{step}); the last checkpoint is intact. Lower optim.lr, check the data, or "
                "raise training.max_consecutive_nonfinite"
            )

    step = start
    pending = None  # (step, metrics, figures) of the last logged step, not yet fetched
    with Preemption() as preemption:
        while step < t_cfg.num_steps:
            state, metrics = train_step(state, next(batches), train_key)
            step += 1
            if pending is not None:
                report(*pending)
                pending = None
            preemption.check(step)
            last = step == t_cfg.num_steps
            if step % t_cfg.log_every == 0 or last or preemption.requested:
                pending = (step, metrics, progress.update(step))
            if step % t_cfg.sample_every == 0 or last:
                key = jax.random.fold_in(sample_key, step)
                run.objective.picture(run, state.ema_params, key, workdir, step)
            if step % t_cfg.ckpt_every == 0 or last or preemption.requested:
                save(step)
            if t_cfg.eval_every and step % t_cfg.eval_every == 0:
                evaluate_and_write(config, workdir, step, state.ema_params, run)
            if preemption.requested:
                log.warning("stopped at step %d after SIGTERM; the same command resumes", step)
                break
        if pending is not None:
            report(*pending)
    t0 = time.perf_counter()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    log.info("checkpoints written (waited %.1fs)", time.perf_counter() - t0)
    return state
