"""DiT weights: diffusers' DiTTransformer2DModel (a DiTPipeline folder, facebook/DiT-XL-2-256
style: transformer/ + vae/ + scheduler/, or a transformer folder alone) and the original
repository's `.pt` files (facebookresearch/DiT: the released DiT-XL-2-256x256.pt state dicts
and train.py's checkpoints) <-> this DiT.

diffusers gives every block its own timestep-and-label embedder
(`transformer_blocks.<i>.norm1.emb.*`); when they are all equal, as in every checkpoint
converted from the original, the import folds them into the one shared embedder `emb`
(exactly: the tensors are equal), else it keeps the per-block layout
(model.dit.per_block_embedders). The export writes the shared embedder into every block.

The original's names map onto diffusers' as (i: block index)

    x_embedder.proj                  pos_embed.proj
    t_embedder.mlp.0 / mlp.2         emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table       emb.class_embedder.embedding_table
    blocks.i.attn.qkv                transformer_blocks.i.attn1.to_q | to_k | to_v (stacked)
    blocks.i.attn.proj               transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc1 / fc2           transformer_blocks.i.ff.net.0.proj / ff.net.2
    blocks.i.adaLN_modulation.1      transformer_blocks.i.norm1.linear
    final_layer.adaLN_modulation.1   proj_out_1
    final_layer.linear               proj_out_2
    pos_embed                        (the fixed 2-D sin-cos table: checked, not stored)

Two conventions differ between the two (model.dit.freq_shift and mlp_norm_eps): diffusers'
port computes the timestep features with frequency shift 1 and the MLP's LayerNorm with eps
1e-5, the original with 0 and 1e-6. Each import keeps the conventions of its source, so its
outputs equal what that source computes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from diffusion_jax import diffusion as dm
from diffusion_jax.config import base_config, model_input_shape
from diffusion_jax.models import factory
from diffusion_jax.models.autoencoder import downsampling_factor
from diffusion_jax.models.convert import autoencoder, layout, torch_pickle
from diffusion_jax.models.convert.unet import diffusion_from_scheduler
from diffusion_jax.models.dit import sincos_position_embedding
from diffusion_jax.recipes import DIT_SIZES

# Transformer2DModel is the class name the Hub's DiT folders were saved under.
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
_BLOCK_EMB = re.compile(r"^transformer_blocks\.(\d+)\.norm1\.emb\.(.+)$")
# The original repository's names -> diffusers' (qkv is split apart separately).
ORIGINAL_NAMES = (
    (r"^x_embedder\.proj\.", "pos_embed.proj."),
    (r"^t_embedder\.mlp\.0\.", "emb.timestep_embedder.linear_1."),
    (r"^t_embedder\.mlp\.2\.", "emb.timestep_embedder.linear_2."),
    (r"^y_embedder\.embedding_table\.", "emb.class_embedder.embedding_table."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"transformer_blocks.\1.attn1.to_out.0."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^blocks\.(\d+)\.adaLN_modulation\.1\.", r"transformer_blocks.\1.norm1.linear."),
    (r"^final_layer\.adaLN_modulation\.1\.", "proj_out_1."),
    (r"^final_layer\.linear\.", "proj_out_2."),
)


def _dit_config(
    *,
    size,
    in_channels,
    out_channels,
    patch_size,
    hidden_size,
    depth,
    num_heads,
    mlp_ratio,
    num_classes,
    null_class,
):
    """A full run config whose model is this DiT over (size, size, in_channels) inputs, with
    the original's diffusion: linear betas over 1000 steps, learned_range variance with the
    hybrid loss when the output channels double."""
    config = base_config()
    d, m = config.data, config.model
    d.image_size, d.channels = size, in_channels
    m.arch = "dit"
    m.dit.update(
        patch_size=patch_size,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=float(mlp_ratio),
    )
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"weights: {out_channels} output channels for {in_channels} input ones")
    m.learn_sigma = out_channels == 2 * in_channels
    m.class_conditional = num_classes > 0
    d.num_classes = num_classes
    config.training.cond_drop_prob = 0.1 if null_class else 0.0
    if m.learn_sigma:
        config.diffusion.variance, config.diffusion.loss_type = "learned_range", "hybrid"
    return config


def config_from_diffusers(cfg: dict, scheduler: dict | None = None) -> ml_collections.ConfigDict:
    """A full run config whose model describes a DiTTransformer2DModel config.json."""

    def require(ok, key, why):
        if not ok:
            raise ValueError(f"config.json: {key}={cfg.get(key)!r} {why}")

    require(cfg.get("_class_name") in TRANSFORMER_CLASSES, "_class_name", "is not a DiT")
    require(cfg.get("norm_type") == "ada_norm_zero", "norm_type", "is not supported")
    require(bool(cfg.get("num_embeds_ada_norm")), "num_embeds_ada_norm", "must be set")
    act = cfg.get("activation_fn", "gelu-approximate")
    require(act == "gelu-approximate", "activation_fn", "is not supported")
    require(cfg.get("attention_bias", True), "attention_bias", "must be true")
    require(not cfg.get("norm_elementwise_affine"), "norm_elementwise_affine", "must be false")
    require(not cfg.get("cross_attention_dim"), "cross_attention_dim", "is not supported")
    in_channels = int(cfg.get("in_channels", 4))
    config = _dit_config(
        size=int(cfg["sample_size"]),
        in_channels=in_channels,
        out_channels=int(cfg.get("out_channels") or in_channels),
        patch_size=int(cfg["patch_size"]),
        hidden_size=int(cfg["num_attention_heads"] * cfg["attention_head_dim"]),
        depth=int(cfg["num_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        mlp_ratio=4.0,  # BasicTransformerBlock's FeedForward
        num_classes=int(cfg["num_embeds_ada_norm"]),
        null_class=True,  # diffusers' LabelEmbedding always has the null row
    )
    m = config.model
    m.dropout = float(cfg.get("dropout", 0.0))
    m.dit.update(freq_shift=1.0, mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)))
    if scheduler:
        diffusion_from_scheduler(config.diffusion, scheduler)
        if m.learn_sigma:
            config.diffusion.variance = "learned_range"
    return config


def _fold_embedders(tensors: dict) -> tuple[dict, bool]:
    """(tensors, folded): the per-block embedder tensors replaced by one shared `emb.*` set
    when every block's equals block 0's exactly, else unchanged."""
    per_block: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = _BLOCK_EMB.match(name)
        if match:
            per_block.setdefault(match.group(2), {})[match.group(1)] = value
    if not per_block:
        return tensors, False
    same = all(
        all(np.array_equal(v, blocks["0"]) for v in blocks.values())
        for blocks in per_block.values()
    )
    if not same:
        return tensors, False
    folded = {k: v for k, v in tensors.items() if not _BLOCK_EMB.match(k)}
    folded.update({f"emb.{leaf}": blocks["0"] for leaf, blocks in per_block.items()})
    return folded, True


def params_from_tensors(tensors: dict[str, np.ndarray], config) -> dict:
    """This DiT's parameters from diffusers-named tensors (the shared embedder as `emb.*`);
    fails naming the first tensor that is missing, misshaped or left over."""
    model = factory.create_dit(config)
    shapes = factory.abstract_params(model, *factory.init_inputs(config))
    return layout.match_tensors(tensors, shapes)


def _from_tensors(tensors: dict, config, fold: bool) -> dict:
    if fold:
        tensors, folded = _fold_embedders(tensors)
        config.model.dit.per_block_embedders = not folded
    else:
        config.model.dit.per_block_embedders = any(_BLOCK_EMB.match(k) for k in tensors)
    return params_from_tensors(tensors, config)


def is_dit_folder(folder) -> bool:
    """Whether `folder` is a DiTPipeline folder or a DiT transformer folder."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        folder = folder / "transformer"
    cfg = layout.read_json(folder / "config.json")
    return bool(cfg) and cfg.get("_class_name") in TRANSFORMER_CLASSES


def from_diffusers(folder, *, fold: bool = True) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config) of a DiT in the diffusers layout: a DiTPipeline folder
    (model_index.json, transformer/, vae/, scheduler/: a latent run over its VAE, which
    autoencoder.weights names) or a transformer folder alone (config.json + safetensors; a
    run on its own input). `fold` folds equal per-block embedders into one (module doc)."""
    folder = Path(folder)
    pipeline = (folder / "model_index.json").exists()
    transformer = folder / "transformer" if pipeline else folder
    cfg = json.loads(
        layout.require_file(transformer / "config.json", "a diffusers DiT folder?").read_text()
    )
    scheduler = layout.read_json(
        (folder if pipeline else folder.parent) / "scheduler" / "scheduler_config.json"
    )
    config = config_from_diffusers(cfg, scheduler)
    weights = layout.require_file(transformer / layout.WEIGHTS_FILE, "download the safetensors")
    params = _from_tensors(load_file(str(weights)), config, fold)
    if pipeline and (folder / "vae" / "config.json").exists():
        _use_vae(config, folder / "vae")
    return params, config


def _use_vae(config, vae_folder: Path) -> None:
    """Turns the config of a DiT on latents into a latent run over the AutoencoderKL in
    `vae_folder`: the images are the latent size times the VAE's downsampling."""
    fields = autoencoder.autoencoder_fields_from_diffusers(
        json.loads((vae_folder / "config.json").read_text())
    )
    if fields["latent_channels"] != config.data.channels:
        raise ValueError(
            f"{vae_folder}: {fields['latent_channels']} latent channels, the DiT takes "
            f"{config.data.channels}"
        )
    config.data.image_size *= downsampling_factor(fields["ch_mult"])
    config.data.channels = fields.pop("image_channels")
    config.autoencoder.update(fields)
    config.autoencoder.weights = str(vae_folder)
    config.sampling.clip_denoised = False


def diffusers_config(config) -> dict:
    """The DiTTransformer2DModel config.json that describes this DiT."""
    m, dt = config.model, config.model.dit
    size, channels = model_input_shape(config)
    if not m.class_conditional or config.training.cond_drop_prob <= 0:
        raise ValueError(
            "model.class_conditional: diffusers' DiT has a label table with its null row; "
            "export a class-conditional DiT trained with training.cond_drop_prob > 0"
        )
    if dt.mlp_ratio != 4.0:
        raise ValueError(f"model.dit.mlp_ratio: diffusers' DiT has 4, not {dt.mlp_ratio}")
    return {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": dt.num_heads,
        "attention_head_dim": dt.hidden_size // dt.num_heads,
        "in_channels": channels,
        "out_channels": channels * (2 if m.learn_sigma else 1),
        "num_layers": dt.depth,
        "dropout": m.dropout,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": size,
        "patch_size": dt.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.data.num_classes,
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": dt.mlp_norm_eps,
    }


def to_tensors(params, config) -> dict[str, np.ndarray]:
    """diffusers-named tensors of this DiT, the shared embedder written into every block."""
    tensors = layout.torch_tensors(params)
    shared = {k[len("emb.") :]: tensors.pop(k) for k in list(tensors) if k.startswith("emb.")}
    for i in range(config.model.dit.depth):
        for leaf, value in shared.items():
            tensors[f"transformer_blocks.{i}.norm1.emb.{leaf}"] = value
    return tensors


def to_diffusers(params, config, folder, vae_params=None) -> None:
    """Writes `params` of this DiT as a DiTPipeline folder: model_index.json, transformer/
    (config.json + safetensors), scheduler/ (a DDPMScheduler of config.diffusion) and, given
    the parameters of the run's autoencoder, vae/. diffusers evaluates the timestep features
    with frequency shift 1 whatever model.dit.freq_shift says (module doc)."""
    folder = Path(folder)
    cfg = diffusers_config(config)
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    save_file(to_tensors(params, config), str(folder / "transformer" / layout.WEIGHTS_FILE))
    (folder / "transformer" / "config.json").write_text(json.dumps(cfg, indent=2))
    f = config.diffusion
    scheduler = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": f.num_timesteps,
        "beta_schedule": {"cosine": "squaredcos_cap_v2"}.get(f.schedule, f.schedule),
        "prediction_type": {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[f.prediction],
        "variance_type": f.variance,
        "clip_sample": False,
    }
    if f.schedule in ("linear", "scaled_linear"):
        with jax.enable_x64(True):  # the end points as published, not rounded
            betas = dm.make_schedule(
                f.schedule,
                f.num_timesteps,
                beta_start=f.beta_start if f.beta_start >= 0 else None,
                beta_end=f.beta_end if f.beta_end >= 0 else None,
            ).betas
        scheduler.update(beta_start=float(betas[0]), beta_end=float(betas[-1]))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "DiTPipeline",
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if vae_params is not None:
        fields = {**config.autoencoder.to_dict(), "image_channels": config.data.channels}
        autoencoder.autoencoder_to_diffusers(vae_params, fields, folder / "vae")
        index["vae"] = ["diffusers", "AutoencoderKL"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def original_state_dict(path) -> dict[str, np.ndarray]:
    """The state dict of an original-repository `.pt`: the file itself (the released weights)
    or, in a train.py checkpoint, its "ema" (else "model") entry."""
    state = torch_pickle.load(path)
    if isinstance(state, dict) and "x_embedder.proj.weight" not in state:
        state = state.get("ema", state.get("model"))
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise ValueError(f"{path}: not a DiT state dict or checkpoint (no x_embedder.proj)")
    return {k: np.asarray(v) for k, v in state.items()}


def from_original(
    path, *, num_heads: int | None = None, num_classes: int | None = None, vae=None
) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config) of a DiT `.pt` of the original repository. The shapes give the
    architecture but not the heads: `num_heads`, else DiT's for the width (S 6, B 12, L and XL
    16). The label table has the null row unless `num_classes` says it has none. With `vae`
    (a diffusers AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema) the config is a
    latent run over it; without, a run on the DiT's own input."""
    tensors = original_state_dict(path)
    proj = tensors["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    heads = num_heads or {w: h for _, w, h in DIT_SIZES.values()}.get(hidden)
    if not heads:
        raise ValueError(f"{path}: width {hidden} is no DiT size; give num_heads")
    depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
    pos = tensors.pop("pos_embed")
    grid = int(round(pos.shape[1] ** 0.5))
    rows = tensors["y_embedder.embedding_table.weight"].shape[0]
    classes = rows - 1 if num_classes is None else num_classes
    if rows not in (classes, classes + 1):
        raise ValueError(f"{path}: a label table of {rows} rows for {classes} classes")
    config = _dit_config(
        size=grid * patch,
        in_channels=in_channels,
        out_channels=tensors["final_layer.linear.weight"].shape[0] // patch**2,
        patch_size=patch,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=tensors["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=classes,
        null_class=rows == classes + 1,
    )
    if not np.allclose(pos.reshape(grid * grid, hidden), sincos_position_embedding(hidden, grid)):
        raise ValueError(f"{path}: pos_embed is not DiT's 2-D sin-cos table")
    params = params_from_tensors(_diffusers_names(tensors), config)
    if vae is not None:
        _use_vae(config, Path(vae))
    return params, config


def _diffusers_names(tensors: dict) -> dict:
    """Original names -> diffusers' (module doc); qkv split into to_q, to_k, to_v."""
    out = {}
    for name, value in tensors.items():
        qkv = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
        if qkv:
            i, leaf = qkv.groups()
            for part, chunk in zip(("to_q", "to_k", "to_v"), np.split(value, 3), strict=True):
                out[f"transformer_blocks.{i}.attn1.{part}.{leaf}"] = chunk
            continue
        for pattern, replacement in ORIGINAL_NAMES:
            if re.match(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        out[name] = value
    return out
