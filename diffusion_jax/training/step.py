"""The pure train step and its sharded, jitted form.

The step knows no objective: it draws the inputs and takes the loss through the
`objectives.Objective` it is given, whose settings are bound when the run is set up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import diffusion as dm
from diffusion_jax import parallel
from diffusion_jax.training.state import TrainState, ema_decay_at, ema_update


def _split_micro(x, num_micro: int):
    """(B, ...) -> (num_micro, B / num_micro, ...), micro-batch i = rows i, i + k, i + 2k, ...

    Strided, so that every micro-batch takes rows from every device's shard."""
    if x is None:
        return None
    return jnp.moveaxis(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 1, 0)


def compute_grads(loss_fn, params, inputs, key, *, grad_accum: int, unroll=None):
    """Gradient of the batch-mean loss, accumulated over `grad_accum` micro-batches by a scan.

    loss_fn(params, inputs, key) -> (mean loss, {term: mean}). The loss is a mean over k
    equally sized micro-batches, so grad = (1/k) sum_i grad_i equals the whole batch's
    gradient up to float rounding (dropout masks aside). `unroll`: None unrolls the loop on
    CPU only (see below), True / False force it."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, terms), grads = grad_fn(params, inputs, key)
        return loss, terms, grads
    micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), inputs)

    def body(acc, xs):
        index, micro_inputs = xs
        out = grad_fn(params, micro_inputs, jax.random.fold_in(key, index))
        return jax.tree.map(jnp.add, acc, out), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # XLA:CPU leaves the weight-gradient convolutions of a while-loop body in a layout that
    # only its generic kernel runs (20x slower at the digits size); unrolled, they are the
    # same convolutions as the plain step's. Accelerators keep the loop: one body to compile.
    if unroll is None:
        unroll = jax.default_backend() == "cpu"
    total, _ = jax.lax.scan(
        body, zeros, (jnp.arange(grad_accum), micro), unroll=grad_accum if unroll else 1
    )
    (loss, terms), grads = jax.tree.map(lambda x: x / grad_accum, total)
    return loss, terms, grads


def train_step(
    state: TrainState,
    batch,
    train_key,
    *,
    model,
    objective,
    optimizer,
    lr_schedule,
    grad_accum: int,
    ema_decay: float,
    ema_warmup: bool,
    ema_gammas: tuple[float, ...] = (),
):
    """One update: loss, gradient (accumulated), clipping + Adam, EMA; skipped if not finite.

    `ema_gammas`: the exponents of the power-function EMAs in `state.power_emas`, updated
    with beta_t = (1 - 1/t)^(gamma + 1) at update t (`diffusion.ema`); like the exponential
    EMA, each is an elementwise update of arrays sharded like the parameters, so it adds no
    communication.

    `objective` (`objectives.Objective`) draws the step's inputs and gives the loss of
    `model`. The step's key is fold_in(train_key, state.step): no key is carried in the
    state, and a resumed run draws the same noise as an uninterrupted one.

    Returns the new state and scalar metrics (loss, grad_norm, lr, skipped, ...).
    """
    key = jax.random.fold_in(train_key, state.step)
    k_inputs, k_dropout = jax.random.split(key)
    inputs = objective.draw_inputs(k_inputs, batch)
    loss, terms, grads = compute_grads(
        functools.partial(objective.loss, model=model, train=True),
        state.params,
        inputs,
        k_dropout,
        grad_accum=grad_accum,
    )
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    decay = ema_decay_at(state.step, ema_decay, ema_warmup)

    t = state.num_updates + 1  # this update's time, if it is applied

    def apply_update(params, ema_params, opt_state, power_emas):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        power_emas = tuple(
            ema_update(profile, params, dm.power_ema_beta(t, gamma))
            for profile, gamma in zip(power_emas, ema_gammas, strict=True)
        )
        return params, ema_update(ema_params, params, decay), opt_state, power_emas

    # A cond rather than a select per leaf: a skipped step reads nothing, a taken one does
    # not read and write every parameter, EMA and moment a second time.
    params, ema_params, opt_state, power_emas = jax.lax.cond(
        finite,
        apply_update,
        lambda *old: old,
        state.params,
        state.ema_params,
        state.opt_state,
        state.power_emas,
    )
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        power_emas=power_emas,
        skipped_steps=state.skipped_steps + skipped,
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": lr_schedule(state.step - state.skipped_steps),
        "ema_decay": decay,
        "skipped": skipped,
        "skipped_steps": new_state.skipped_steps,
        "consecutive_skips": new_state.consecutive_skips,
        **{f"loss_{k}": v for k, v in terms.items() if k != "loss"},
    }
    return new_state, metrics


def make_train_step(*, mesh, state_sharding, **step_kwargs):
    """`train_step` as one `jax.jit` over the mesh: the state keeps its (FSDP) sharding and is
    donated, the batch is split over every device, metrics come back replicated.
    `step_kwargs`: the keyword arguments of `train_step`."""
    step = functools.partial(train_step, **step_kwargs)
    return jax.jit(
        step,
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
