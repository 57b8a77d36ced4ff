"""train_and_evaluate(config, workdir): the whole training run, top to bottom."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import checkpointing, latents, metrics_io, parallel
from diffusion_jax import config as config_lib
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import sampling
from diffusion_jax.models import create_model, init_inputs
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.step import make_train_step

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


def init_fns(config, model, optimizer):
    """(init_fn(key) -> TrainState, boxed abstract variables) for this model."""
    inputs = init_inputs(config)

    def init_fn(key):
        params = nn.unbox(model.init(key, *inputs))["params"]
        return state_lib.TrainState.create(params, optimizer)

    boxed = jax.eval_shape(lambda k: model.init(k, *inputs), jax.random.key(0))
    return init_fn, boxed["params"]


def batch_spec(config, batch_size: int, sharding=None) -> dict:
    """Shapes of a training batch: images (or latents, in a latent run), labels, and the
    text context of text-conditioned models."""
    if config.training.objective == "autoencoder":
        size, channels = config.data.image_size, config.data.channels
    else:
        size, channels = config_lib.model_input_shape(config)
    spec = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, size, size, channels), jnp.float32, sharding=sharding
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
    }
    m = config.model
    if config.training.objective == "diffusion" and config_lib.is_text_conditioned(config):
        spec["context"] = jax.ShapeDtypeStruct(
            (batch_size, m.context_length, m.context_dim), jnp.float32, sharding=sharding
        )
    return spec


class RunSetup(NamedTuple):
    """What train, eval and sample all build from a config: mesh, model, schedule, optimizer,
    and the abstract sharded state (no device memory touched yet)."""

    mesh: Any
    model: Any
    sched: Any
    optimizer: Any
    lr_schedule: Any
    init_fn: Any
    abstract_state: Any  # jax.ShapeDtypeStruct leaves with .sharding
    state_sharding: Any
    config: Any
    samplers: dict  # jitted samplers by return_x0_at, built once per run
    decoder: Any = None  # (decode_fn, autoencoder params) of a latent run

    def sample_fn(self, return_x0_at=None):
        """The run's jitted sampler (`sampling.make_sample_fn`), compiled once and reused by
        the training grids, evaluation and sample mode; it returns decoded images in a
        latent run."""
        if return_x0_at not in self.samplers:
            self.samplers[return_x0_at] = sampling.make_sample_fn(
                self.model,
                self.sched,
                self.config,
                self.mesh,
                return_x0_at=return_x0_at,
                decoder=self.decoder,
            )
        return self.samplers[return_x0_at]

    def reconstruct_fn(self):
        """An autoencoder run's jitted fn(params, images) -> decoded posterior means in
        [-1, 1], compiled once per run."""
        if "reconstruct" not in self.samplers:
            model = self.model

            def reconstruct(params, x):
                mean, _ = model.apply({"params": params}, x, method=model.encode)
                x_hat = model.apply({"params": params}, mean, method=model.decode)
                return jnp.clip(x_hat, -1.0, 1.0)

            self.samplers["reconstruct"] = jax.jit(reconstruct)
        return self.samplers["reconstruct"]

    def init_state(self, init_key) -> state_lib.TrainState:
        """A fresh state, created already sharded: no host ever holds all of it."""
        return jax.jit(self.init_fn, out_shardings=self.state_sharding)(init_key)

    def make_step(self):
        """The jitted, sharded, state-donating train step of this run."""
        return make_train_step(
            model=self.model,
            sched=self.sched,
            config=self.config,
            optimizer=self.optimizer,
            lr_schedule=self.lr_schedule,
            mesh=self.mesh,
            state_sharding=self.state_sharding,
        )


def setup_run(config, init_key, devices=None) -> RunSetup:
    mesh = parallel.make_mesh(config, devices)
    model = create_model(config)
    sched = sampling.schedule_from_config(config)
    lr_schedule = state_lib.learning_rate_schedule(config.optim, config.training.num_steps)
    optimizer = state_lib.make_optimizer(config.optim, config.training.num_steps)
    init_fn, boxed_params = init_fns(config, model, optimizer)
    abstract_state = jax.eval_shape(init_fn, init_key)
    state_sharding = parallel.state_shardings(
        mesh, abstract_state, abstract_state.params, parallel.logical_axes_tree(boxed_params)
    )
    abstract = checkpointing.abstract_with_shardings(abstract_state, state_sharding)
    decoder = None
    if config_lib.is_latent(config):
        autoencoder, ae_params = latents.load_autoencoder(config)
        ae_params = jax.device_put(ae_params, parallel.replicated(mesh))
        decoder = (
            latents.make_decode_fn(autoencoder, config.autoencoder.scaling_factor),
            ae_params,
        )
    return RunSetup(
        mesh,
        model,
        sched,
        optimizer,
        lr_schedule,
        init_fn,
        abstract,
        state_sharding,
        config,
        {},
        decoder,
    )


def run_keys(config):
    """(init, train, sample) keys, all from config.training.seed."""
    return jax.random.split(jax.random.key(config.training.seed), 3)


GIB = 2**30


def compile_and_plan_memory(train_step, state, config, mesh, train_key):
    """Compiles the step ahead of time, logs its memory per device, and refuses a run that
    will not fit the device with the number and the knobs to turn (instead of an XLA OOM)."""
    batch = batch_spec(config, config.training.batch_size, parallel.batch_sharding(mesh))
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch, train_key).compile()
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


def write_reconstructions(run, params, config, path, num: int = 32) -> None:
    """An autoencoder run's picture: rows of held-out images over their reconstructions
    (decoded posterior means)."""
    batch = sampling.padded_batch(num, run.mesh.size)
    images = next(
        pipeline.create_iterator(
            config, run.mesh, split=config.data.eval_split, global_batch=batch, train=False
        )
    )["image"]
    recon = sampling.gather(run.reconstruct_fn()(params, images))[:num]
    images = sampling.gather(images)[:num]
    per_row = 8
    rows = [
        half[i : i + per_row]
        for i in range(0, num - per_row + 1, per_row)
        for half in (images, recon)
    ]
    metrics_io.save_grid(path, np.concatenate(rows), rows=len(rows))


def write_samples(sample_fn, params, config, mesh, key, path) -> None:
    """The grid PNG at `path` and, beside it (.npz), its uint8 images (arr_0) and labels."""
    num = config.sampling.num_samples
    batch = sampling.padded_batch(num, mesh.size)
    labels = sampling.grid_labels(config, batch)
    images = sampling.gather(sample_fn(params, key, labels, batch))[:num]
    rows = config.data.num_classes if config.model.class_conditional else None
    metrics_io.save_grid(path, images, rows=rows)
    if parallel.is_main_process():
        np.savez(
            Path(path).with_suffix(".npz"),
            arr_0=metrics_io.to_uint8(images),
            labels=np.asarray(labels)[:num] if labels is not None else np.zeros(0, np.int32),
        )


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
            latents.encode_dataset(config, workdir)

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

    train_step = compile_and_plan_memory(run.make_step(), state, config, mesh, train_key)
    autoencoder_run = t_cfg.objective == "autoencoder"
    sample_fn = None if autoencoder_run else run.sample_fn()
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
            if (step % t_cfg.sample_every == 0 or last) and autoencoder_run:
                path = workdir / "samples" / f"reconstructions_step_{step}.png"
                write_reconstructions(run, state.ema_params, config, path)
            elif step % t_cfg.sample_every == 0 or last:
                write_samples(
                    sample_fn,
                    state.ema_params,
                    config,
                    mesh,
                    jax.random.fold_in(sample_key, step),
                    workdir / "samples" / f"step_{step}.png",
                )
            if step % t_cfg.ckpt_every == 0 or last or preemption.requested:
                save(step)
            if t_cfg.eval_every and step % t_cfg.eval_every == 0:
                from diffusion_jax.evaluation.evaluate import evaluate_and_write

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
