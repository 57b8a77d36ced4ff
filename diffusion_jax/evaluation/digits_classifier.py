"""A small CNN trained on the digits training split; its 64-d penultimate features give
`digits_fd`, the Frechet distance used to score the digits default (not FID: Inception
features of 16x16 greyscale digits would mean little).

The shipped weights (digits_classifier.msgpack beside this file) were made by
    python -m diffusion_jax.tools.digits_classifier
which trains for 1,500 steps from seed 0 on CPU in about a minute and prints the held-out
accuracy.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.data import digits

WEIGHTS = Path(__file__).with_name("digits_classifier.msgpack")
IMAGE_SIZE = 16
FEATURES = 64


class DigitsClassifier(nn.Module):
    """(B, 16, 16, 1) in [-1, 1] -> (logits (B, 10), features (B, 64))."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(32, (3, 3))(x))
        h = nn.avg_pool(h, (2, 2), (2, 2))
        h = nn.relu(nn.Conv(64, (3, 3))(h))
        h = nn.avg_pool(h, (2, 2), (2, 2))
        features = nn.relu(nn.Dense(FEATURES)(h.reshape(h.shape[0], -1)))
        return nn.Dense(digits.NUM_CLASSES)(features), features


def train(steps: int = 1500, seed: int = 0, batch: int = 128):
    images, labels = digits.load_digits("train", IMAGE_SIZE)
    model = DigitsClassifier()
    params = model.init(jax.random.key(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(images), batch)
        # One-pixel random shifts make the features robust to the samplers' small offsets.
        shift = rng.integers(-1, 2, 2)
        x = np.roll(images[idx], tuple(shift), axis=(1, 2))
        params, opt_state, loss = step(params, opt_state, x, labels[idx])
    return params


def load_params(path=WEIGHTS):
    model = DigitsClassifier()
    like = model.init(jax.random.key(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1)))["params"]
    return flax.serialization.from_bytes(like, Path(path).read_bytes())


@jax.jit
def _apply(params, images):
    return DigitsClassifier().apply({"params": params}, images)


def features_and_logits(params, images: np.ndarray, batch: int = 500):
    """images (N, 16, 16, 1) in [-1, 1] -> (features (N, 64), logits (N, 10)) as NumPy."""
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"digits classifier: images must be (N, 16, 16, 1), got {images.shape}")
    feats, logits = [], []
    for i in range(0, len(images), batch):
        lg, ft = _apply(params, jnp.asarray(images[i : i + batch], jnp.float32))
        feats.append(np.asarray(ft))
        logits.append(np.asarray(lg))
    return np.concatenate(feats), np.concatenate(logits)


if __name__ == "__main__":  # the program moved; say where instead of doing nothing
    raise SystemExit("moved: python -m diffusion_jax.tools.digits_classifier")
