"""transformers' CLIPTextModel (Stable Diffusion's `text_encoder/`) <-> this text encoder:
config.json <-> config.text_encoder fields, model.safetensors <-> params."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from diffusion_jax.models import factory
from diffusion_jax.models.convert import layout
from diffusion_jax.models.text_encoder import CLIPTextEncoder, text_encoder_inputs

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
    folder = Path(folder)
    cfg = json.loads(
        layout.require_file(folder / "config.json", "a CLIPTextModel folder?").read_text()
    )
    fields = text_encoder_fields(cfg)
    model = CLIPTextEncoder(**fields)
    shapes = factory.abstract_params(model, *text_encoder_inputs(fields["max_length"]))
    tensors = load_file(
        str(layout.require_file(folder / TEXT_ENCODER_FILE, "the text encoder weights"))
    )
    prefix = _prefix(tensors)
    # A buffer of positions 0..L-1 some files carry; it holds no parameters.
    tensors.pop(prefix + "embeddings.position_ids", None)
    return layout.match_tensors(tensors, shapes, prefix=prefix), fields


def _prefix(names) -> str:
    # Published files (transformers 4) name tensors "text_model.*"; transformers 5 drops it.
    return TEXT_PREFIX if any(name.startswith(TEXT_PREFIX) for name in names) else ""


def tensor_prefix(folder) -> str:
    """The tensor-name prefix of a CLIPTextModel folder's weights ("text_model." or ""),
    read from the file's header; "text_model." (the published files') without one."""
    path = Path(folder) / TEXT_ENCODER_FILE
    if not path.exists():
        return TEXT_PREFIX
    with safe_open(str(path), framework="numpy") as f:
        return _prefix(f.keys())


def text_encoder_to_transformers(params, fields: dict, folder) -> None:
    """Writes text encoder params as a transformers CLIPTextModel folder, with the
    "text_model."-prefixed tensor names of the published files."""
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
    save_file(layout.torch_tensors(params, prefix=TEXT_PREFIX), str(folder / TEXT_ENCODER_FILE))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
