"""Import and export of weights in the diffusers / transformers layouts.

A diffusers folder holds `config.json` and `diffusion_pytorch_model.safetensors` (and, for a
pipeline, `scheduler_config.json` beside it or in `../scheduler/`). The published DDPM
checkpoints (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256)
are UNet2DModels; Stable Diffusion's `unet/` is a UNet2DConditionModel, its `vae/` an
AutoencoderKL and its `text_encoder/` a transformers CLIPTextModel (`model.safetensors`).
Tensors are read with safetensors' NumPy API: no torch at run time.

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

from diffusion_jax.config import base_config, model_input_shape
from diffusion_jax.models.autoencoder import downsampling_factor

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Names of diffusers' deprecated attention block, still used by the published DDPM files.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_INDEXED = re.compile(
    r"(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out"
    r"|transformer_blocks|net|layers)_(\d+)"
)
DOWN_BLOCKS = {
    "DownBlock2D": False,
    "AttnDownBlock2D": True,
    "ResnetDownsampleBlock2D": False,
    "CrossAttnDownBlock2D": True,
}
UP_BLOCKS = {
    "UpBlock2D": False,
    "AttnUpBlock2D": True,
    "ResnetUpsampleBlock2D": False,
    "CrossAttnUpBlock2D": True,
}
# UNet2DConditionModel options this U-Net does not have; refused when set.
UNSUPPORTED_CONDITION_OPTIONS = (
    "class_embed_type",
    "addition_embed_type",
    "encoder_hid_dim",
    "time_cond_proj_dim",
    "dual_cross_attention",
    "only_cross_attention",
    "mid_block_only_cross_attention",
    "num_class_embeds",
)


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
    # Cross-attention blocks belong to UNet2DConditionModel, plain attention ones to UNet2DModel.
    conditioned = cfg.get("_class_name") == "UNet2DConditionModel"

    def known(block, table):
        return block in table and (not table[block] or block.startswith("CrossAttn") == conditioned)

    for level, block in enumerate(cfg["down_block_types"]):
        require(known(block, DOWN_BLOCKS), "down_block_types", f"contains unknown block {block!r}")
        if DOWN_BLOCKS[block]:
            attn.append(size // 2**level)
        updown.add(block == "ResnetDownsampleBlock2D" or cfg.get("downsample_type") == "resnet")
    for block in cfg["up_block_types"]:
        require(known(block, UP_BLOCKS), "up_block_types", f"contains unknown block {block!r}")
    require(len(updown) == 1, "down_block_types", "mix conv and resnet downsampling")
    d, m = config.data, config.model
    d.image_size = size
    d.channels = cfg["in_channels"]
    m.ch = ch
    m.ch_mult = tuple(c // ch for c in boc)
    m.num_res_blocks = cfg["layers_per_block"]
    m.attn_resolutions = tuple(attn)
    m.dropout = float(cfg.get("dropout", 0.0))
    if conditioned:
        _condition_model_fields(cfg, m, boc, require)
    else:
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
    num_embeds = None if m.context_dim else cfg.get("num_class_embeds")
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


def _condition_model_fields(cfg: dict, m, boc, require) -> None:
    """The cross-attention fields of a UNet2DConditionModel config.json."""
    for key in UNSUPPORTED_CONDITION_OPTIONS:
        require(not cfg.get(key), key, "is not supported")
    require(
        cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn",
        "mid_block_type",
        "is not supported",
    )
    depth = cfg.get("transformer_layers_per_block", 1)
    require(isinstance(depth, int), "transformer_layers_per_block", "must be one integer")
    # diffusers reads attention_head_dim as the number of heads when num_attention_heads is
    # unset (Stable Diffusion v1/v2 configs rely on this).
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, list | tuple) else [heads] * len(boc)
    m.context_dim = int(cfg["cross_attention_dim"])
    m.context_source = "text"
    m.transformer_depth = depth
    m.linear_projection = bool(cfg.get("use_linear_projection", False))
    if len(set(heads)) == 1:
        m.num_heads, m.head_channels = int(heads[0]), -1
    else:
        widths = {c // h for c, h in zip(boc, heads, strict=True)}
        require(len(widths) == 1, "attention_head_dim", "gives heads of unequal widths")
        m.num_heads, m.head_channels = 1, widths.pop()


def _abstract_params(config):
    from diffusion_jax.models import create_model, init_inputs

    model = create_model(config)
    shapes = jax.eval_shape(lambda k: model.init(k, *init_inputs(config)), jax.random.key(0))
    return nn.unbox(shapes)["params"]


def _rename_legacy_attention(tensors: dict) -> dict:
    tensors = dict(tensors)
    for name in list(tensors):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
            tensors[".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])] = tensors.pop(
                name
            )
    return tensors


def params_from_tensors(tensors: dict[str, np.ndarray], config) -> dict:
    """This U-Net's parameters from diffusers-named tensors; fails naming the first tensor that
    is missing, misshaped or left over."""
    return match_tensors(_rename_legacy_attention(tensors), _abstract_params(config))


def match_tensors(tensors: dict[str, np.ndarray], abstract_params, *, prefix: str = "") -> dict:
    """The parameter tree shaped like `abstract_params` from tensors named `prefix` +
    `diffusers_name(path)`, transposed to the Flax layout; fails naming the first tensor that
    is missing, misshaped or left over."""
    tensors = dict(tensors)
    flat = flax.traverse_util.flatten_dict(abstract_params)
    params = {}
    for path, like in flat.items():
        name = prefix + diffusers_name(path)
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
    m = config.model
    size, channels = model_input_shape(config)
    boc = [m.ch * k for k in m.ch_mult]
    attn = [size // 2**i in m.attn_resolutions for i in range(len(boc))]
    down = "ResnetDownsampleBlock2D" if m.resblock_updown else "DownBlock2D"
    up = "ResnetUpsampleBlock2D" if m.resblock_updown else "UpBlock2D"
    out = {
        "_class_name": "UNet2DModel",
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels * (2 if m.learn_sigma else 1),
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
        "num_class_embeds": config.data.num_classes + 1 if m.class_conditional else None,
        "time_embedding_type": "positional",
        "act_fn": "silu",
    }
    if m.resblock_updown:
        out["downsample_type"] = out["upsample_type"] = "resnet"
    if m.context_dim > 0:
        if m.context_source != "text" or m.class_conditional:
            raise ValueError(
                "model.context_source: diffusers' UNet2DConditionModel has no class context"
            )
        out.update(
            _class_name="UNet2DConditionModel",
            down_block_types=["CrossAttnDownBlock2D" if a else down for a in attn],
            up_block_types=["CrossAttnUpBlock2D" if a else up for a in reversed(attn)],
            cross_attention_dim=m.context_dim,
            transformer_layers_per_block=m.transformer_depth,
            use_linear_projection=m.linear_projection,
            attention_head_dim=m.num_heads
            if m.head_channels <= 0
            else [c // m.head_channels for c in boc],
        )
        del out["attn_norm_num_groups"], out["num_class_embeds"], out["time_embedding_type"]
        return out
    if m.num_heads != 1 and m.head_channels <= 0:
        raise ValueError(
            "model.num_heads: diffusers describes heads by attention_head_dim; "
            "set model.head_channels instead"
        )
    return out


def torch_tensors(params, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `match_tensors`: diffusers-named float32 tensors in the torch layout."""
    return {
        prefix + diffusers_name(path): np.ascontiguousarray(
            to_torch_layout(np.asarray(value, np.float32), path[-1])
        )
        for path, value in flax.traverse_util.flatten_dict(params).items()
    }


def to_diffusers(params, config, folder) -> None:
    """Writes `params` of this U-Net as a diffusers folder (config.json + safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(torch_tensors(params), str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(diffusers_config(config), indent=2))


def _require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist ({what})")
    return path


def autoencoder_fields_from_diffusers(cfg: dict) -> dict:
    """config.autoencoder fields (and the image channels) of an AutoencoderKL config.json."""

    def require(ok, key, why):
        if not ok:
            raise ValueError(f"config.json: {key}={cfg.get(key)!r} {why}")

    boc = list(cfg["block_out_channels"])
    ch = boc[0]
    require(all(c % ch == 0 for c in boc), "block_out_channels", "are not multiples of the first")
    require(cfg.get("act_fn", "silu") in ("silu", "swish"), "act_fn", "is not supported")
    for key in ("use_quant_conv", "use_post_quant_conv"):
        require(cfg.get(key, True), key, "must be true")
    for key in ("down_block_types", "up_block_types"):
        wanted = "DownEncoderBlock2D" if key.startswith("down") else "UpDecoderBlock2D"
        require(all(b == wanted for b in cfg[key]), key, f"must all be {wanted}")
    return {
        "ch": ch,
        "ch_mult": tuple(c // ch for c in boc),
        "num_res_blocks": int(cfg["layers_per_block"]),
        "latent_channels": int(cfg["latent_channels"]),
        "norm_groups": int(cfg.get("norm_num_groups", 32)),
        "norm_eps": 1e-6,
        "mid_attention": bool(cfg.get("mid_block_add_attention", True)),
        "scaling_factor": float(cfg.get("scaling_factor", 0.18215)),
        "image_channels": int(cfg["in_channels"]),
    }


def autoencoder_from_diffusers(folder) -> tuple[dict, dict]:
    """(params, config.autoencoder fields + image_channels) of a diffusers AutoencoderKL
    folder."""
    from diffusion_jax.models.autoencoder import AutoencoderKL

    folder = Path(folder)
    cfg = json.loads(_require_file(folder / "config.json", "an AutoencoderKL folder?").read_text())
    fields = autoencoder_fields_from_diffusers(cfg)
    model = AutoencoderKL(**{k: fields[k] for k in fields if k != "scaling_factor"})
    size = 2 ** len(fields["ch_mult"])
    latent = size // downsampling_factor(fields["ch_mult"])
    shapes = jax.eval_shape(
        lambda k: model.init(
            k,
            jnp.zeros((1, size, size, fields["image_channels"])),
            jnp.zeros((1, latent, latent, fields["latent_channels"])),
        ),
        jax.random.key(0),
    )
    weights = _require_file(folder / WEIGHTS_FILE, "download the safetensors file")
    tensors = _rename_legacy_attention(load_file(str(weights)))
    return match_tensors(tensors, nn.unbox(shapes)["params"]), fields


def autoencoder_to_diffusers(params, fields: dict, folder) -> None:
    """Writes autoencoder params as a diffusers AutoencoderKL folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    boc = [fields["ch"] * k for k in fields["ch_mult"]]
    cfg = {
        "_class_name": "AutoencoderKL",
        "in_channels": fields["image_channels"],
        "out_channels": fields["image_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * len(boc),
        "up_block_types": ["UpDecoderBlock2D"] * len(boc),
        "block_out_channels": boc,
        "layers_per_block": fields["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": fields["latent_channels"],
        "norm_num_groups": fields["norm_groups"],
        "scaling_factor": fields["scaling_factor"],
        "mid_block_add_attention": fields["mid_attention"],
    }
    save_file(torch_tensors(params), str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


TEXT_ENCODER_FILE = "model.safetensors"
TEXT_PREFIX = "text_model."


def text_encoder_fields(cfg: dict) -> dict:
    """config.text_encoder fields of a transformers CLIPTextConfig config.json."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"config.json: hidden_act={act!r} is not supported")
    return {
        "vocab_size": int(cfg["vocab_size"]),
        "width": int(cfg["hidden_size"]),
        "num_layers": int(cfg["num_hidden_layers"]),
        "num_heads": int(cfg["num_attention_heads"]),
        "mlp_dim": int(cfg["intermediate_size"]),
        "max_length": int(cfg.get("max_position_embeddings", 77)),
        "activation": act,
        "eps": float(cfg.get("layer_norm_eps", 1e-5)),
    }


def text_encoder_from_transformers(folder) -> tuple[dict, dict]:
    """(params, config.text_encoder fields) of a transformers CLIPTextModel folder
    (config.json + model.safetensors, e.g. Stable Diffusion's `text_encoder/`)."""
    from diffusion_jax.models.text_encoder import CLIPTextEncoder

    folder = Path(folder)
    cfg = json.loads(_require_file(folder / "config.json", "a CLIPTextModel folder?").read_text())
    fields = text_encoder_fields(cfg)
    model = CLIPTextEncoder(**fields)
    shapes = jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, fields["max_length"]), jnp.int32)),
        jax.random.key(0),
    )
    tensors = load_file(str(_require_file(folder / TEXT_ENCODER_FILE, "the text encoder weights")))
    # Published files (transformers 4) name tensors "text_model.*"; transformers 5 drops it.
    prefix = TEXT_PREFIX if any(name.startswith(TEXT_PREFIX) for name in tensors) else ""
    # A buffer of positions 0..L-1 some files carry; it holds no parameters.
    tensors.pop(prefix + "embeddings.position_ids", None)
    return match_tensors(tensors, nn.unbox(shapes)["params"], prefix=prefix), fields


def text_encoder_to_transformers(params, fields: dict, folder) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": fields["vocab_size"],
        "hidden_size": fields["width"],
        "num_hidden_layers": fields["num_layers"],
        "num_attention_heads": fields["num_heads"],
        "intermediate_size": fields["mlp_dim"],
        "max_position_embeddings": fields["max_length"],
        "hidden_act": fields["activation"],
        "layer_norm_eps": fields["eps"],
    }
    save_file(torch_tensors(params, prefix=TEXT_PREFIX), str(folder / TEXT_ENCODER_FILE))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def from_pipeline(folder) -> tuple[dict, ml_collections.ConfigDict]:
    """A Stable Diffusion style pipeline folder (unet/, vae/, text_encoder/, scheduler/) as
    ({"unet", "autoencoder", "text_encoder"} params, a config whose model, diffusion,
    autoencoder and text_encoder sections describe it). The U-Net works on latents of the
    VAE; data.image_size is the decoded image size."""
    folder = Path(folder)
    _require_file(folder / "model_index.json", "a diffusers pipeline folder?")
    unet, config = from_diffusers(folder / "unet")
    vae, ae_fields = autoencoder_from_diffusers(folder / "vae")
    text, te_fields = text_encoder_from_transformers(folder / "text_encoder")
    latent_size = config.data.image_size
    config.data.image_size = latent_size * downsampling_factor(ae_fields["ch_mult"])
    config.data.channels = ae_fields.pop("image_channels")
    config.autoencoder.update(ae_fields)
    config.text_encoder.update(te_fields)
    config.pretrained = str(folder)
    config.sampling.clip_denoised = False
    return {"unet": unet, "autoencoder": vae, "text_encoder": text}, config


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
