"""One run setup for every job: what training, evaluation, sampling and encoding all build
from a config.

`setup_run(config, init_key)` gives the mesh, the noise schedule, the objective (chosen once,
`objectives.for_config`), its model, the optimizer and the abstract sharded state, with no
device memory touched yet; the run caches the functions it compiles (the sampler, the
reconstruction of an autoencoder) so that every job of one process compiles them once.
`run_keys` splits the run's seed; `restore_ema` reads the EMA weights a job evaluates;
`load_autoencoder` reads the autoencoder a latent run works through.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import checkpointing, errors, export, generation, objectives, parallel
from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import convert
from diffusion_jax.models.factory import abstract_params
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.step import make_train_step


def schedule_from_config(config) -> dm.Schedule:
    """The noise schedule of config.diffusion (a negative beta means the published value)."""
    f = config.diffusion
    return dm.make_schedule(
        f.schedule,
        f.num_timesteps,
        beta_start=f.beta_start if f.beta_start >= 0 else None,
        beta_end=f.beta_end if f.beta_end >= 0 else None,
    )


def ema_gammas(config) -> tuple[float, ...]:
    """The exponents of the power-function EMAs of optim.ema_sigma_rels."""
    return tuple(float(dm.sigma_rel_to_gamma(s)) for s in config.optim.ema_sigma_rels)


def run_keys(config):
    """(init, train, sample) keys, all from config.training.seed."""
    return jax.random.split(jax.random.key(config.training.seed), 3)


class RunSetup(NamedTuple):
    """Mesh, objective, model, schedule, optimizer and the abstract sharded state of a run."""

    mesh: Any
    objective: objectives.Objective
    model: Any
    sched: Any
    optimizer: Any
    lr_schedule: Any
    init_fn: Any  # key -> TrainState
    abstract_state: Any  # jax.ShapeDtypeStruct leaves with .sharding
    state_sharding: Any
    config: Any
    compiled: dict  # functions compiled for this run, by name
    decoder: Any = None  # (decode_fn, autoencoder params) of a latent run

    def _cached(self, name, build):
        if name not in self.compiled:
            self.compiled[name] = build()
        return self.compiled[name]

    def sample_fn(self, return_x0_at=None):
        """The run's jitted sampler (`generation.make_sample_fn`), compiled once and reused by
        the training grids, evaluation and sample mode; it returns decoded images in a
        latent run."""
        return self._cached(
            ("sample", return_x0_at),
            lambda: generation.make_sample_fn(
                self.model,
                self.sched,
                self.config,
                self.mesh,
                return_x0_at=return_x0_at,
                decoder=self.decoder,
                null_context=self._cached("null_context", self._null_context),
            ),
        )

    def _null_context(self):
        """The unconditional context of a run fine-tuned from a pipeline folder: its text
        encoder's context of sampling.negative_prompt ("" by default), as the pipeline was
        trained and samples (its token ids when the text encoder trains, which the network
        then encodes with its own weights); None (zeros) for other runs, whose dropped
        contexts are zeros."""
        if not (self.config.training.init_from and config_lib.is_text_conditioned(self.config)):
            return None
        return jnp.asarray(
            objectives.prompt_context(self.config, self.config.sampling.negative_prompt)
        )

    def reconstruct_fn(self):
        """An autoencoder run's jitted fn(params, images) -> decoded posterior means in
        [-1, 1] (`objectives.reconstruct`), compiled once per run."""
        return self._cached(
            "reconstruct", lambda: jax.jit(functools.partial(objectives.reconstruct, self.model))
        )

    def generate(self, params, num: int, key, *, labels=None, progress_every: int = 1, x0_at=None):
        """`generation.generate` with this run's sampler: `num` samples, uint8; with `x0_at`
        (evaluation indices), also the x0 predictions of the first batch at those steps."""
        return generation.generate(
            self.sample_fn(),
            self.config,
            self.mesh,
            params,
            num,
            key,
            labels=labels,
            progress_every=progress_every,
            x0_fn=None if x0_at is None else self.sample_fn(return_x0_at=x0_at),
        )

    def write_samples(self, params, key, path) -> None:
        """`generation.write_samples` with this run's sampler: a grid PNG and its .npz."""
        generation.write_samples(self.sample_fn(), self.config, self.mesh, params, key, path)

    def init_state(self, init_key) -> state_lib.TrainState:
        """A fresh state, created already sharded: no host ever holds all of it. A run
        fine-tuned from a pipeline folder (training.init_from) starts from its U-Net's
        weights (the EMA too), read on each host and placed shard by shard."""
        if self.config.training.init_from:
            folder = Path(self.config.training.init_from)
            params, _ = convert.from_diffusers(folder / "unet")
            if self.config.training.train_text_encoder:
                text, _ = convert.text_encoder_from_transformers(folder / "text_encoder")
                params = {"unet": params, "text_encoder": text}
            params = jax.device_put(params, self.state_sharding.params)
            count = len(self.config.optim.ema_sigma_rels)
            create = functools.partial(
                state_lib.TrainState.create, optimizer=self.optimizer, num_power_emas=count
            )
            return jax.jit(create, out_shardings=self.state_sharding)(params)
        return jax.jit(self.init_fn, out_shardings=self.state_sharding)(init_key)

    def make_step(self):
        """The jitted, sharded, state-donating train step of this run."""
        o, t = self.config.optim, self.config.training
        return make_train_step(
            mesh=self.mesh,
            state_sharding=self.state_sharding,
            model=self.model,
            objective=self.objective,
            optimizer=self.optimizer,
            lr_schedule=self.lr_schedule,
            grad_accum=t.grad_accum,
            ema_decay=o.ema_decay,
            ema_warmup=o.ema_warmup,
            ema_gammas=ema_gammas(self.config),
        )


def setup_run(config, init_key, devices=None) -> RunSetup:
    """The run of `config` on a mesh over `devices` (default: all devices)."""
    mesh = parallel.make_mesh(config, devices)
    sched = schedule_from_config(config)
    objective = objectives.for_config(config, sched)
    model = objective.create_model(config)
    lr_schedule = state_lib.learning_rate_schedule(config.optim, config.training.num_steps)
    optimizer = state_lib.make_optimizer(config.optim, config.training.num_steps)
    inputs = objective.init_inputs(config)

    def init_fn(key):
        params = nn.unbox(model.init(key, *inputs))["params"]
        return state_lib.TrainState.create(params, optimizer, len(config.optim.ema_sigma_rels))

    boxed_params = abstract_params(model, *inputs, boxed=True)
    abstract_state = jax.eval_shape(init_fn, init_key)
    state_sharding = parallel.state_shardings(
        mesh, abstract_state, abstract_state.params, parallel.logical_axes_tree(boxed_params)
    )
    abstract = checkpointing.abstract_with_shardings(abstract_state, state_sharding)
    decoder = None
    if config_lib.is_latent(config):
        autoencoder, ae_params = load_autoencoder(config)
        ae_params = jax.device_put(ae_params, parallel.replicated(mesh))
        decoder = (
            ae_lib.make_decode_fn(autoencoder, config.autoencoder.scaling_factor),
            ae_params,
        )
    return RunSetup(
        mesh=mesh,
        objective=objective,
        model=model,
        sched=sched,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        init_fn=init_fn,
        abstract_state=abstract,
        state_sharding=state_sharding,
        config=config,
        compiled={},
        decoder=decoder,
    )


def restore_ema(config, workdir, step: int | None, run: RunSetup | None = None):
    """(step, EMA params placed for this run's mesh, run) from the checkpoint of `step` (None:
    the newest) or from eval.params_file (an exported single file, step 0); `run` is set up
    when not given.

    Unless eval.checkpoint_step asked for `step` by name, an unreadable checkpoint is moved
    aside and the newest readable one not after it is used instead (else the next one after
    it), so that eval and sample work on a workdir whose newest checkpoint is corrupt.
    """
    if run is None:
        run = setup_run(config, run_keys(config)[0])
    width = config.eval.ema_sigma_rel
    if width > 0 and width not in tuple(config.optim.ema_sigma_rels):
        return _restore_posthoc(config, workdir, step, run)
    if config.eval.params_file:
        return 0, _load_placed(config.eval.params_file, run), run
    manager = checkpointing.make_manager(workdir, read_only=True)
    available = manager.all_steps()
    if not available:
        raise FileNotFoundError(
            f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}; "
            "train first (--mode=train) or set eval.params_file"
        )
    step = max(available) if step is None else step
    if step not in available:
        raise errors.ConfigError(
            f"config.eval.checkpoint_step: no checkpoint {step} in {manager.directory} "
            f"(have {sorted(available)})"
        )
    advice = None
    if config.eval.checkpoint_step >= 0:  # asked for by name: that one or an error
        candidates = [step]
        advice = f"choose another config.eval.checkpoint_step (have {sorted(available)})"
    else:
        candidates = sorted((s for s in available if s <= step), reverse=True)
        candidates += sorted(s for s in available if s > step)
    profile = None
    if width > 0:  # a tracked power-function EMA, read from the checkpoint itself
        tracked = tuple(config.optim.ema_sigma_rels)
        profile = (tracked.index(width), len(tracked))
    step, params = checkpointing.first_readable(
        manager,
        candidates,
        lambda s: checkpointing.restore_ema(manager, s, run.abstract_state.ema_params, profile),
        advice,
    )
    return step, params, run


def posthoc_path(workdir, sigma_rel: float, step: int) -> Path:
    """Where --mode=posthoc_ema writes the EMA of width `sigma_rel` rebuilt at `step`."""
    return Path(workdir) / "posthoc_ema" / f"sigma_rel_{sigma_rel:.4f}_step_{step}.msgpack"


def posthoc_steps(workdir, sigma_rel: float, step: int | None = None) -> list[int]:
    """The steps, oldest first, at which --mode=posthoc_ema rebuilt the EMA of width
    `sigma_rel`; FileNotFoundError naming the fix when there is none (or not `step`)."""
    prefix = posthoc_path(workdir, sigma_rel, 0).name.rsplit("_", 1)[0] + "_"
    folder = Path(workdir) / "posthoc_ema"
    names = [p.name for p in folder.glob(f"{prefix}*.msgpack")] if folder.is_dir() else []
    steps = sorted(int(n[len(prefix) : -len(".msgpack")]) for n in names)
    if not steps or (step is not None and step not in steps):
        at = f" at step {step}" if step is not None and steps else ""
        raise FileNotFoundError(
            f"config.eval.ema_sigma_rel: no EMA of width {sigma_rel} rebuilt{at} in {folder}; "
            f"run --mode=posthoc_ema --config.eval.ema_sigma_rel={sigma_rel} first"
        )
    return steps


def _restore_posthoc(config, workdir, step: int | None, run: RunSetup):
    """(step, params, run) of the EMA of width eval.ema_sigma_rel that --mode=posthoc_ema
    rebuilt at `step` (None: the newest)."""
    width = config.eval.ema_sigma_rel
    steps = posthoc_steps(workdir, width, step)
    step = max(steps) if step is None else step
    return step, _load_placed(posthoc_path(workdir, width, step), run), run


def _load_placed(path, run: RunSetup):
    """The parameters of an exported file, placed like the run's parameters; one line naming
    the file (or training.train_text_encoder) when they are another network's."""
    params, _ = export.load_params(path)
    shardings = run.state_sharding.params
    checkpointing.check_text_encoder(params, shardings, str(path))
    if jax.tree.structure(params) != jax.tree.structure(shardings) or any(
        np.shape(x) != s.shape
        for x, s in zip(
            jax.tree.leaves(params), jax.tree.leaves(run.abstract_state.params), strict=True
        )
    ):
        raise errors.ConfigError(
            f"{path}: its parameters are not those of this config's model (its .json beside "
            "it has the config that wrote it)"
        )
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)


def checkpoint_step_arg(config) -> int | None:
    """eval.checkpoint_step, or None (the newest) when it is negative."""
    return config.eval.checkpoint_step if config.eval.checkpoint_step >= 0 else None


def load_autoencoder(config):
    """(module, params) of the autoencoder a latent run works through.

    `autoencoder.weights` names it: the workdir of a run with
    `training.objective="autoencoder"` (its newest checkpoint's EMA weights), a file written
    by `--mode=export`, or a diffusers AutoencoderKL folder (config.json + safetensors, e.g.
    Stable Diffusion's `vae/`; by default `<pretrained>/vae`). Its architecture must equal
    `config.autoencoder`.
    """
    source = Path(config.autoencoder.weights or Path(config.pretrained) / "vae")
    if not source.exists():
        raise FileNotFoundError(
            f"config.autoencoder.weights: {source} does not exist; train one with "
            "--config.training.objective=autoencoder or give a diffusers AutoencoderKL folder"
        )
    if source.is_dir() and (source / convert.WEIGHTS_FILE).exists():
        params, fields = convert.autoencoder_from_diffusers(source)
        ae_lib.check_architecture(config, fields, source)
    elif source.is_file():
        params, saved = export.load_params(source)
        ae_lib.check_architecture(config, saved.autoencoder.to_dict(), source)
    else:
        params = _restore_autoencoder_run(config, source)
    return ae_lib.create_autoencoder(config), jax.tree.map(jnp.asarray, params)


def _restore_autoencoder_run(config, source: Path):
    """The newest EMA parameters of the autoencoder run in workdir `source`."""
    run_config = source / "config.json"
    if not run_config.exists():
        raise FileNotFoundError(
            f"config.autoencoder.weights: {source} is not an autoencoder run (no config.json), "
            "an exported .msgpack or a diffusers AutoencoderKL folder"
        )
    saved = json.loads(run_config.read_text())
    if saved["training"].get("objective") != "autoencoder":
        raise errors.ConfigError(
            f"config.autoencoder.weights: {source} trained "
            f"{saved['training'].get('objective', 'diffusion')!r}, not an autoencoder"
        )
    ae_lib.check_architecture(config, saved["autoencoder"], run_config)
    manager = checkpointing.make_manager(source, read_only=True)
    steps = manager.all_steps()
    if not steps:
        where = checkpointing.checkpoint_dir(source)
        raise FileNotFoundError(f"config.autoencoder.weights: no checkpoint in {where}")
    autoencoder = objectives.autoencoder(config)
    abstract = abstract_params(autoencoder.create_model(config), *autoencoder.init_inputs(config))
    params = checkpointing.restore_ema(manager, max(steps), abstract)
    manager.close()
    return params
