"""diffusers' UNet2DModel (the DDPM checkpoints) and UNet2DConditionModel (Stable
Diffusion's `unet/`) <-> this U-Net: config.json <-> config.model (and config.diffusion from
scheduler_config.json), diffusion_pytorch_model.safetensors <-> params."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from diffusion_jax.config import base_config, model_input_shape
from diffusion_jax.models import factory
from diffusion_jax.models.convert import layout

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
        diffusion_from_scheduler(f, scheduler)
    return config


def diffusion_from_scheduler(f, scheduler: dict) -> None:
    """Sets config.diffusion `f` from a diffusers scheduler_config.json: the betas, the
    number of steps, the prediction and (when the scheduler names one) the variance."""
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
    # upcast_attention (2.x) needs nothing: attention logits and softmax are float32 here
    # whatever model.dtype (`layers.multi_head_attention`).
    if len(set(heads)) == 1:
        m.num_heads, m.head_channels = int(heads[0]), -1
    else:
        widths = {c // h for c, h in zip(boc, heads, strict=True)}
        require(len(widths) == 1, "attention_head_dim", "gives heads of unequal widths")
        m.num_heads, m.head_channels = 1, widths.pop()


def params_from_tensors(tensors: dict[str, np.ndarray], config) -> dict:
    """This U-Net's parameters from diffusers-named tensors; fails naming the first tensor that
    is missing, misshaped or left over."""
    shapes = factory.abstract_params(factory.create_unet(config), *factory.init_inputs(config))
    return layout.match_tensors(layout.rename_legacy_attention(tensors), shapes)


def from_diffusers(folder) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config) of the UNet2DModel saved in `folder` (config.json + safetensors)."""
    folder = Path(folder)
    cfg = layout.read_json(folder / "config.json")
    if cfg is None:
        raise FileNotFoundError(f"{folder / 'config.json'} does not exist (a diffusers folder?)")
    weights = folder / layout.WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist; download the safetensors file")
    scheduler = layout.read_json(folder / "scheduler_config.json") or layout.read_json(
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
            # What this U-Net computes in any dtype; diffusers in float16 needs it for 2.x.
            upcast_attention=True,
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


def to_diffusers(params, config, folder) -> None:
    """Writes `params` of this U-Net as a diffusers folder (config.json + safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(layout.torch_tensors(params), str(folder / layout.WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(diffusers_config(config), indent=2))
