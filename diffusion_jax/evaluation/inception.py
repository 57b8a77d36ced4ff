"""InceptionV3 with exactly the layout of the FID network: TensorFlow's 2015-12-05 graph as
pytorch-fid ports it (its FIDInceptionA/C/E_1/E_2 blocks, average pools that exclude the
padding, a max pool in the last block, 1008 logits).

Input as pytorch-fid feeds it: uint8 images, scaled to [0, 1], resized to 299x299 with
bilinear interpolation (half-pixel centers, no antialiasing: torch's F.interpolate with
align_corners=False), then mapped to [-1, 1]; greyscale images are repeated to 3 channels.

Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, read without torch, or an .npz
of the same arrays (`python -m diffusion_jax.tools.inception_weights IN.pth OUT.npz`).
"""

from __future__ import annotations

from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import factory

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FEATURES = 2048
NUM_LOGITS = 1008


def _pad(p):
    return ((p[0], p[0]), (p[1], p[1]))


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, running statistics) -> ReLU."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=_pad(self.padding),
            use_bias=False,
            name="conv",
        )(x)
        bn = BatchNormParams(self.features, name="bn")
        return nn.relu(bn(x))


class BatchNormParams(nn.Module):
    """Inference batch norm with torch's parameter names kept apart (weight, bias,
    running_mean, running_var) so the state dict maps one to one."""

    features: int
    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        p = {
            n: self.param(n, nn.initializers.zeros, (self.features,))
            for n in ("weight", "bias", "running_mean", "running_var")
        }
        inv = jax.lax.rsqrt(p["running_var"] + self.eps) * p["weight"]
        return (x - p["running_mean"]) * inv + p["bias"]


def _avg_pool(x):
    # pytorch-fid: count_include_pad=False, as the TF graph's average pools.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """E_1 (Mixed_7b) pools by average without padding; E_2 (Mixed_7c) by max, as the TF
    graph does."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """(B, 299, 299, 3) in [-1, 1] -> (pool3 features (B, 2048), logits (B, 1008))."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        features = x.mean(axis=(1, 2))
        logits = nn.Dense(NUM_LOGITS, name="fc")(features)
        return features, logits


def preprocess(images_uint8):
    """uint8 (B, H, W, C in {1, 3}) -> float32 (B, 299, 299, 3) in [-1, 1], as pytorch-fid."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = jax.image.resize(x, (x.shape[0], 299, 299, 3), method="bilinear", antialias=False)
    return 2.0 * x - 1.0


# The torch state dict <-> these parameters.


def abstract_params():
    """The shapes of the network's parameters (nothing allocated)."""
    return factory.abstract_params(FIDInceptionV3(), jnp.zeros((1, 299, 299, 3)))


def torch_name(path: tuple[str, ...]) -> str:
    *modules, leaf = path
    leaf = {"kernel": "weight"}.get(leaf, leaf)
    return ".".join(modules + [leaf])


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid's state dict names and torch-layout shapes (num_batches_tracked left out)."""
    out = {}
    for path, x in flax.traverse_util.flatten_dict(abstract_params()).items():
        shape = x.shape
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        out[torch_name(path)] = tuple(shape)
    return out


def params_from_state_dict(state: dict[str, np.ndarray]) -> dict:
    """Flax parameters from pytorch-fid's state dict; fails naming the first bad tensor."""
    params = {}
    for path, like in flax.traverse_util.flatten_dict(abstract_params()).items():
        name = torch_name(path)
        if name not in state:
            raise ValueError(f"inception weights: tensor {name!r} is missing")
        value = np.asarray(state[name], np.float32)
        if path[-1] == "kernel":
            value = np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T
        if value.shape != like.shape:
            raise ValueError(
                f"inception weights: tensor {name!r} has shape {value.shape} "
                f"after transposing, expected {like.shape}"
            )
        params[path] = jnp.asarray(value)
    return flax.traverse_util.unflatten_dict(params)


def missing_weights_error(path) -> FileNotFoundError:
    return FileNotFoundError(
        f"Inception weights {path} do not exist: download {WEIGHTS_URL} and set "
        "eval.inception_weights to it (or to the .npz from `python -m "
        "diffusion_jax.tools.inception_weights IN.pth OUT.npz`)"
    )


def load_state_dict(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise missing_weights_error(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    from diffusion_jax.models.convert import torch_pickle

    return torch_pickle.load_state_dict(path)


def load_params(path) -> dict:
    """Parameters from pytorch-fid's .pth (read without torch) or an .npz of its arrays."""
    return params_from_state_dict(load_state_dict(path))


@jax.jit
def _features_and_logits(params, images_uint8):
    return FIDInceptionV3().apply({"params": params}, preprocess(images_uint8))


def fid_features_and_logits(params, images_uint8, batch_size: int = 200, mesh=None):
    """(pool3 features (N, 2048), logits (N, 1008)) of uint8 images (N, H, W, C), in batches;
    each batch is split over the devices of `mesh` when given."""
    feats, logits = [], []
    sharding = None
    if mesh is not None:
        from diffusion_jax import parallel

        sharding = parallel.batch_sharding(mesh)
        batch_size = -(-batch_size // mesh.size) * mesh.size
    images_uint8 = np.asarray(images_uint8)
    for i in range(0, len(images_uint8), batch_size):
        chunk = images_uint8[i : i + batch_size]
        n = len(chunk)
        if sharding is not None and n % mesh.size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], mesh.size - n % mesh.size, 0)])
        x = jax.device_put(chunk, sharding) if sharding is not None else chunk
        f, lg = _features_and_logits(params, x)
        feats.append(np.asarray(f)[:n])
        logits.append(np.asarray(lg)[:n])
    return np.concatenate(feats), np.concatenate(logits)


def fid_features(params, images_uint8, batch_size: int = 200, mesh=None) -> np.ndarray:
    """pool3 features (N, 2048) float32 of uint8 images (N, H, W, C)."""
    return fid_features_and_logits(params, images_uint8, batch_size, mesh)[0]


if __name__ == "__main__":  # the program moved; say where instead of doing nothing
    raise SystemExit("moved: python -m diffusion_jax.tools.inception_weights")
