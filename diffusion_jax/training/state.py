"""The training state and the optimizer built from `config.optim`."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a run carries from step to step; a pytree, checkpointed whole.

    step: int32 scalar, the number of updates attempted.
    params, ema_params: parameter pytrees (float32).
    opt_state: the optax state of `make_optimizer`.
    skipped_steps: int32 scalar, updates skipped because the loss or gradient was not finite.
    consecutive_skips: int32 scalar, skips since the last good update.
    power_emas: one parameter pytree per power-function EMA profile of
        optim.ema_sigma_rels (EDM2), sharded like the parameters; () when none is tracked.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    skipped_steps: jax.Array
    consecutive_skips: jax.Array
    power_emas: tuple = ()

    @classmethod
    def create(
        cls, params, optimizer: optax.GradientTransformation, num_power_emas: int = 0
    ) -> TrainState:
        zero = jnp.zeros((), jnp.int32)
        return cls(
            step=zero,
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=optimizer.init(params),
            skipped_steps=zero,
            consecutive_skips=zero,
            power_emas=tuple(jax.tree.map(jnp.copy, params) for _ in range(num_power_emas)),
        )

    @property
    def num_updates(self) -> jax.Array:
        """Updates applied so far: the time t of the power-function EMAs."""
        return self.step - self.skipped_steps


def learning_rate_schedule(optim, num_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to optim.lr over optim.warmup_steps, then constant or a cosine
    decay to 0 at num_steps."""
    warmup = max(int(optim.warmup_steps), 0)
    if optim.decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.lr, max(warmup, 1), max(num_steps, warmup + 1), end_value=0.0
        )
    if warmup == 0:
        return optax.constant_schedule(optim.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)],
        [warmup],
    )


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (optim.grad_clip > 0), then Adam or AdamW with the schedule above."""
    lr = learning_rate_schedule(optim, num_steps)
    if optim.optimizer == "adamw":
        opt = optax.adamw(lr, optim.beta1, optim.beta2, optim.eps, weight_decay=optim.weight_decay)
    else:
        opt = optax.adam(lr, optim.beta1, optim.beta2, optim.eps)
    if optim.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt


def ema_decay_at(step, decay: float, warmup: bool):
    """The EMA decay at `step`: `decay`, or min(decay, (1 + step) / (10 + step)) with warm-up."""
    if not warmup:
        return jnp.asarray(decay, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
