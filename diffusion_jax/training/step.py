"""The pure train step and its sharded, jitted form."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import diffusion as dm
from diffusion_jax import parallel
from diffusion_jax.models.autoencoder import autoencoder_loss, downsampling_factor
from diffusion_jax.training.state import TrainState, ema_decay_at, ema_update


def draw_step_inputs(key, batch, sched, *, num_classes: int, cond_drop_prob: float):
    """The randomness of one diffusion step for the whole batch: t ~ U{0..T-1}, eps ~ N(0, I),
    and the conditioning with a fraction `cond_drop_prob` dropped: class labels replaced by
    the null label `num_classes`, text contexts (batch["context"], (B, M, D)) by zeros.

    Drawn for the whole global batch before any micro-batching, so that gradient
    accumulation sees exactly the examples one large step would.
    """
    x0 = batch["image"]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = dm.sample_timesteps(k_t, x0.shape[0], sched.num_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    drop = jax.random.bernoulli(k_drop, cond_drop_prob, (x0.shape[0],))
    labels = context = None
    if num_classes > 0:
        labels = batch["label"]
        if cond_drop_prob > 0:
            labels = jnp.where(drop, num_classes, labels)
    if "context" in batch:
        context = jnp.where(drop[:, None, None], 0.0, batch["context"])
    return {"x0": x0, "t": t, "noise": noise, "labels": labels, "context": context}


def draw_autoencoder_inputs(key, batch, latent_shape):
    """The images and the noise of the posterior sample z = mean + std * noise."""
    x0 = batch["image"]
    noise = jax.random.normal(key, (x0.shape[0],) + tuple(latent_shape), jnp.float32)
    return {"x0": x0, "noise": noise}


def loss_fn(params, inputs, dropout_key, *, model, sched, config, train: bool = True):
    """Mean loss over a (micro-)batch and its mean terms, for `config.training.objective`."""
    if config.training.objective == "autoencoder":
        x_hat, mean, logvar = model.apply({"params": params}, inputs["x0"], inputs["noise"])
        a = config.autoencoder
        loss, terms = autoencoder_loss(
            inputs["x0"],
            x_hat,
            mean,
            logvar,
            kl_weight=a.kl_weight,
            reconstruction=a.reconstruction,
        )
        return loss.mean(), {k: v.mean() for k, v in terms.items()}
    f = config.diffusion
    x_t = dm.q_sample(sched, inputs["x0"], inputs["t"], inputs["noise"])
    out = model.apply(
        {"params": params},
        x_t,
        inputs["t"],
        inputs["labels"],
        train=train,
        context=inputs["context"],
        rngs={"dropout": dropout_key},
    )
    loss, terms = dm.diffusion_loss(
        sched,
        out,
        inputs["x0"],
        x_t,
        inputs["t"],
        inputs["noise"],
        prediction=f.prediction,
        variance=f.variance,
        loss_type=f.loss_type,
        weighting=f.loss_weighting,
        min_snr_gamma=f.min_snr_gamma,
    )
    return loss.mean(), {k: v.mean() for k, v in terms.items()}


def _split_micro(x, num_micro: int):
    """(B, ...) -> (num_micro, B / num_micro, ...), micro-batch i = rows i, i + k, i + 2k, ...

    Strided, so that every micro-batch takes rows from every device's shard."""
    if x is None:
        return None
    return jnp.moveaxis(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 1, 0)


def compute_grads(params, inputs, key, *, grad_accum: int, unroll=None, **loss_kwargs):
    """Gradient of the batch-mean loss, accumulated over `grad_accum` micro-batches by a scan.

    The loss is a mean over k equally sized micro-batches, so grad = (1/k) sum_i grad_i equals
    the whole batch's gradient up to float rounding (dropout masks aside). `unroll`: None
    unrolls the loop on CPU only (see below), True / False force it."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, **loss_kwargs), has_aux=True)
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
    state: TrainState, batch, train_key, *, model, sched, config, optimizer, lr_schedule
):
    """One update: loss, gradient (accumulated), clipping + Adam, EMA; skipped if not finite.

    The step's key is fold_in(train_key, state.step): no key is carried in the state, and a
    resumed run draws the same noise as an uninterrupted one.

    Returns the new state and scalar metrics (loss, grad_norm, lr, skipped, ...).
    """
    key = jax.random.fold_in(train_key, state.step)
    k_inputs, k_dropout = jax.random.split(key)
    if config.training.objective == "autoencoder":
        a = config.autoencoder
        latent = batch["image"].shape[1] // downsampling_factor(a.ch_mult)
        inputs = draw_autoencoder_inputs(k_inputs, batch, (latent, latent, a.latent_channels))
    else:
        num_classes = config.data.num_classes if config.model.class_conditional else 0
        inputs = draw_step_inputs(
            k_inputs,
            batch,
            sched,
            num_classes=num_classes,
            cond_drop_prob=config.training.cond_drop_prob,
        )
    loss, terms, grads = compute_grads(
        state.params,
        inputs,
        k_dropout,
        grad_accum=config.training.grad_accum,
        model=model,
        sched=sched,
        config=config,
    )
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    decay = ema_decay_at(state.step, config.optim.ema_decay, config.optim.ema_warmup)

    def apply_update(params, ema_params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, ema_update(ema_params, params, decay), opt_state

    # A cond rather than a select per leaf: a skipped step reads nothing, a taken one does
    # not read and write every parameter, EMA and moment a second time.
    params, ema_params, opt_state = jax.lax.cond(
        finite,
        apply_update,
        lambda *old: old,
        state.params,
        state.ema_params,
        state.opt_state,
    )
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
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


def make_train_step(*, model, sched, config, optimizer, lr_schedule, mesh, state_sharding):
    """`train_step` as one `jax.jit` over the mesh: the state keeps its (FSDP) sharding and is
    donated, the batch is split over every device, metrics come back replicated."""
    step = functools.partial(
        train_step,
        model=model,
        sched=sched,
        config=config,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
    )
    return jax.jit(
        step,
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
