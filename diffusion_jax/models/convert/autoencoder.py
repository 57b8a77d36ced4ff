"""diffusers' AutoencoderKL (Stable Diffusion's `vae/`) <-> this autoencoder: config.json <->
config.autoencoder fields, diffusion_pytorch_model.safetensors <-> params."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file, save_file

from diffusion_jax.models import factory
from diffusion_jax.models.autoencoder import AutoencoderKL, autoencoder_inputs
from diffusion_jax.models.convert import layout


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
    folder = Path(folder)
    cfg = json.loads(
        layout.require_file(folder / "config.json", "an AutoencoderKL folder?").read_text()
    )
    fields = autoencoder_fields_from_diffusers(cfg)
    model = AutoencoderKL(**{k: fields[k] for k in fields if k != "scaling_factor"})
    # The parameters do not depend on the image size: the smallest one the downsampling
    # stack takes (a 2x2 latent) keeps the shape evaluation cheap.
    size = 2 ** len(fields["ch_mult"])
    inputs = autoencoder_inputs(
        size, fields["image_channels"], fields["ch_mult"], fields["latent_channels"]
    )
    weights = layout.require_file(folder / layout.WEIGHTS_FILE, "download the safetensors file")
    tensors = layout.rename_legacy_attention(load_file(str(weights)))
    return layout.match_tensors(tensors, factory.abstract_params(model, *inputs)), fields


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
    save_file(layout.torch_tensors(params), str(folder / layout.WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
