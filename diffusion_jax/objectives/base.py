"""The shape every training objective has (`Objective`), and the batch spec of images that
both objectives share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Objective(NamedTuple):
    """The functions of one training objective (module doc).

    create_model(config) -> the Flax module trained.
    init_inputs(config, batch) -> example positional inputs of that module, for init.
    batch_spec(config, batch_size, sharding) -> {name: jax.ShapeDtypeStruct} of a batch.
    draw_inputs(key, batch) -> the inputs of `loss` for a whole batch (its randomness).
    loss(params, inputs, dropout_key, *, model, train) -> (mean loss, {term: mean}).
    picture(run, params, key, workdir, step) -> Path of the PNG written for `step`.
    scores(run, params, key, score_samples) -> {name: value} of held-out evaluation;
        score_samples(images_uint8, params, key) -> {metric: value} scores generated images.
    generative: whether the model draws new samples (`--mode=sample` samples it); otherwise
        its picture is what `--mode=sample` writes.
    """

    name: str
    create_model: Callable
    init_inputs: Callable
    batch_spec: Callable
    draw_inputs: Callable
    loss: Callable
    picture: Callable
    scores: Callable
    generative: bool


def _image_batch_spec(batch_size, size, channels, sharding) -> dict[str, Any]:
    return {
        "image": jax.ShapeDtypeStruct(
            (batch_size, size, size, channels), jnp.float32, sharding=sharding
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharding),
    }
