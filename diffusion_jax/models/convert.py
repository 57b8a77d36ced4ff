"""Import and export of U-Net weights in the diffusers layout (UNet2DModel).

A diffusers folder holds `config.json` and `diffusion_pytorch_model.safetensors` (and, for a
pipeline, `scheduler_config.json` beside it or in `../scheduler/`). The published DDPM
checkpoints (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256)
are in this layout. Tensors are read with safetensors' NumPy API: no torch at run time.

Run as `python -m diffusion_jax.models.convert SRC_FOLDER OUT.msgpack` to write the
parameters and the config for `--mode=sample|eval`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from diffusion_jax.config import base_config

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Names of diffusers' deprecated attention block, still used by the published DDPM files.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_INDEXED = re.compile(
    r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)"
)
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True, "ResnetDownsampleBlock2D": False}
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True, "ResnetUpsampleBlock2D": False}


def diffusers_name(path: tuple[str, ...]) -> str:
    """The diffusers name of a parameter path.

    ('down_blocks_1.attentions_0', 'to_q', 'kernel') -> 'down_blocks.1.attentions.0.to_q.weight'
    """
    *modules, leaf = path
    name = _INDEXED.sub(r"\1.\2", ".".join(modules))
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def to_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Flax conv kernel (kh, kw, in, out) -> torch (out, in, kh, kw); Dense (in, out) -> (out, in);
    embeddings, norms and biases keep their layout."""
    if leaf != "kernel":
        return array
    return np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T


def from_torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """The inverse of `to_torch_layout`."""
    if leaf != "kernel":
        return array
    return np.transpose(array, (2, 3, 1, 0)) if array.ndim == 4 else array.T


def model_config_from_diffusers(cfg: dict, scheduler: dict | None = None):
    """A full run config whose data/model/diffusion sections describe a diffusers UNet2DModel."""
    config = base_config()

    def require(ok, key, why):
        if not ok:
            raise ValueError(f"config.json: {key}={cfg.get(key)!r} {why}")

    require(
        cfg.get("time_embedding_type", "positional") == "positional",
        "time_embedding_type",
        "is not supported (only 'positional')",
    )
    require(cfg.get("act_fn", "silu") in ("silu", "swish"), "act_fn", "is not supported")
    require(not cfg.get("center_input_sample", False), "center_input_sample", "is not supported")
    boc = list(cfg["block_out_channels"])
    ch = boc[0]
    require(all(c % ch == 0 for c in boc), "block_out_channels", "are not multiples of the first")
    size = cfg["sample_size"]
    size = size[0] if isinstance(size, list | tuple) else size
    attn, updown = [], set()
    for level, block in enumerate(cfg["down_block_types"]):
        require(block in DOWN_BLOCKS, "down_block_types", f"contains unknown block {block!r}")
        if DOWN_BLOCKS[block]:
            attn.append(size // 2**level)
        updown.add(block == "ResnetDownsampleBlock2D" or cfg.get("downsample_type") == "resnet")
    for block in cfg["up_block_types"]:
        require(block in UP_BLOCKS, "up_block_types", f"contains unknown block {block!r}")
    require(len(updown) == 1, "down_block_types", "mix conv and resnet downsampling")
    d, m = config.data, config.model
    d.image_size = size
    d.channels = cfg["in_channels"]
    m.ch = ch
    m.ch_mult = tuple(c // ch for c in boc)
    m.num_res_blocks = cfg["layers_per_block"]
    m.attn_resolutions = tuple(attn)
    m.dropout = float(cfg.get("dropout", 0.0))
    head_dim = cfg.get("attention_head_dim")
    m.head_channels = int(head_dim) if head_dim else -1
    m.num_heads = 1
    m.scale_shift_norm = cfg.get("resnet_time_scale_shift", "default") == "scale_shift"
    # diffusers gives the mid-block attention no group norm unless the time-embedding norm is
    # "default" or attn_norm_num_groups is set.
    m.mid_attn_norm = not m.scale_shift_norm or bool(cfg.get("attn_norm_num_groups"))
    m.resblock_updown = updown.pop()
    m.downsample_padding = int(cfg.get("downsample_padding", 1))
    m.flip_sin_to_cos = bool(cfg.get("flip_sin_to_cos", True))
    m.freq_shift = float(cfg.get("freq_shift", 0))
    m.norm_groups = int(cfg.get("norm_num_groups", 32))
    m.norm_eps = float(cfg.get("norm_eps", 1e-5))
    m.learn_sigma = cfg["out_channels"] == 2 * cfg["in_channels"]
    num_embeds = cfg.get("num_class_embeds")
    m.class_conditional = bool(num_embeds)
    d.num_classes = num_embeds - 1 if num_embeds else 0
    f = config.diffusion
    if m.learn_sigma:
        f.variance = "learned_range"
    if scheduler:
        names = {
            "linear": "linear",
            "scaled_linear": "scaled_linear",
            "squaredcos_cap_v2": "cosine",
            "sigmoid": "sigmoid",
        }
        f.schedule = names[scheduler.get("beta_schedule", "linear")]
        f.num_timesteps = int(scheduler.get("num_train_timesteps", 1000))
        if f.schedule in ("linear", "scaled_linear"):
            f.beta_start = float(scheduler.get("beta_start", 1e-4))
            f.beta_end = float(scheduler.get("beta_end", 0.02))
        f.prediction = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[
            scheduler.get("prediction_type", "epsilon")
        ]
        variance = scheduler.get("variance_type", "fixed_small")
        f.variance = {
            "fixed_small": "fixed_small",
            "fixed_small_log": "fixed_small",
            "fixed_large": "fixed_large",
            "fixed_large_log": "fixed_large",
            "learned_range": "learned_range",
        }.get(variance, f.variance)
    return config


def _abstract_params(config):
    from diffusion_jax.models import create_model

    size = config.data.image_size
    model = create_model(config)
    x = jnp.zeros((1, size, size, config.data.channels))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))
    return nn.unbox(shapes)["params"]


def params_from_tensors(tensors: dict[str, np.ndarray], config) -> dict:
    """This U-Net's parameters from diffusers-named tensors; fails naming the first tensor that
    is missing, misshaped or left over."""
    tensors = dict(tensors)
    for name in list(tensors):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
            tensors[".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])] = tensors.pop(
                name
            )
    flat = flax.traverse_util.flatten_dict(_abstract_params(config))
    params = {}
    for path, like in flat.items():
        name = diffusers_name(path)
        if name not in tensors:
            raise ValueError(f"weights file: tensor {name!r} (for {'/'.join(path)}) is missing")
        value = from_torch_layout(np.asarray(tensors.pop(name)), path[-1])
        if value.shape != like.shape:
            raise ValueError(
                f"weights file: tensor {name!r} has shape {tuple(value.shape)} after transposing, "
                f"expected {tuple(like.shape)} for {'/'.join(path)}"
            )
        params[path] = jnp.asarray(value, jnp.float32)
    if tensors:
        raise ValueError(f"weights file: tensor {sorted(tensors)[0]!r} matches no parameter")
    return flax.traverse_util.unflatten_dict(params)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def from_diffusers(folder) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config) of the UNet2DModel saved in `folder` (config.json + safetensors)."""
    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    if cfg is None:
        raise FileNotFoundError(f"{folder / 'config.json'} does not exist (a diffusers folder?)")
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist; download the safetensors file")
    scheduler = _read_json(folder / "scheduler_config.json") or _read_json(
        folder.parent / "scheduler" / "scheduler_config.json"
    )
    config = model_config_from_diffusers(cfg, scheduler)
    return params_from_tensors(load_file(str(weights)), config), config


def diffusers_config(config) -> dict:
    """The UNet2DModel config.json that describes this U-Net."""
    d, m = config.data, config.model
    boc = [m.ch * k for k in m.ch_mult]
    attn = [d.image_size // 2**i in m.attn_resolutions for i in range(len(boc))]
    down = "ResnetDownsampleBlock2D" if m.resblock_updown else "DownBlock2D"
    up = "ResnetUpsampleBlock2D" if m.resblock_updown else "UpBlock2D"
    out = {
        "_class_name": "UNet2DModel",
        "sample_size": d.image_size,
        "in_channels": d.channels,
        "out_channels": d.channels * (2 if m.learn_sigma else 1),
        "block_out_channels": boc,
        "layers_per_block": m.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else down for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else up for a in reversed(attn)],
        "attention_head_dim": m.head_channels if m.head_channels > 0 else None,
        "resnet_time_scale_shift": "scale_shift" if m.scale_shift_norm else "default",
        "downsample_padding": m.downsample_padding,
        "flip_sin_to_cos": m.flip_sin_to_cos,
        "freq_shift": m.freq_shift,
        "norm_num_groups": m.norm_groups,
        "attn_norm_num_groups": m.norm_groups if m.mid_attn_norm and m.scale_shift_norm else None,
        "norm_eps": m.norm_eps,
        "dropout": m.dropout,
        "num_class_embeds": d.num_classes + 1 if m.class_conditional else None,
        "time_embedding_type": "positional",
        "act_fn": "silu",
    }
    if m.resblock_updown:
        out["downsample_type"] = out["upsample_type"] = "resnet"
    if m.num_heads != 1 and m.head_channels <= 0:
        raise ValueError(
            "model.num_heads: diffusers describes heads by attention_head_dim; "
            "set model.head_channels instead"
        )
    return out


def to_diffusers(params, config, folder) -> None:
    """Writes `params` of this U-Net as a diffusers folder (config.json + safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        diffusers_name(path): np.ascontiguousarray(
            to_torch_layout(np.asarray(value, np.float32), path[-1])
        )
        for path, value in flax.traverse_util.flatten_dict(params).items()
    }
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(diffusers_config(config), indent=2))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m diffusion_jax.models.convert DIFFUSERS_FOLDER OUT.msgpack")
        return 2
    from diffusion_jax import export

    params, config = from_diffusers(argv[0])
    export.save_params(argv[1], params, config)
    print(f"wrote {argv[1]} ({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
