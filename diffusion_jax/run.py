"""One run setup for every job: what training, evaluation, sampling and encoding all build
from a config.

`setup_run(config, init_key)` gives the mesh, the noise schedule, the objective (chosen once,
`objectives.for_config`), its model, the optimizer and the abstract sharded state, with no
device memory touched yet; the run caches the functions it compiles (the sampler, the
reconstruction of an autoencoder) so that every job of one process compiles them once.
`run_keys` splits the run's seed. Which weights a job then uses (a checkpoint's EMA, an
exported file, a post-hoc EMA, the autoencoder) is `weights.py`'s answer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import checkpointing, generation, objectives, parallel, weights
from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax.models import autoencoder as ae_lib
from diffusion_jax.models import prompts
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
            prompts.prompt_context(self.config, self.config.sampling.negative_prompt)
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
        fine-tuned from a pipeline folder (training.init_from) starts from its weights
        (`weights.init_params`; the EMA too), read on each host and placed shard by shard."""
        if self.config.training.init_from:
            params = jax.device_put(weights.init_params(self.config), self.state_sharding.params)
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
        autoencoder, ae_params = weights.load_autoencoder(config)
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
