"""Whether a config can work, checked before anything is built: `validate(config,
num_devices)` raises `ConfigError` naming the field and the fix, in one line, on the first
problem; `mesh_shape` resolves config.mesh's -1 against the devices. The fields themselves,
their defaults and comments live in config.py; recipes call neither.
"""

from __future__ import annotations

import math

import ml_collections

from diffusion_jax.config import (
    ARCHS,
    DTYPES,
    EVAL_METRICS,
    EXPORT_FORMATS,
    MESH_AXES,
    OBJECTIVES,
    SAMPLER_FIELDS,
    is_latent,
    is_text_conditioned,
    model_input_shape,
    resolved_sampling,
    sample_settings,
)
from diffusion_jax.diffusion import ema, losses, schedules
from diffusion_jax.diffusion.sampler_settings import SettingError
from diffusion_jax.errors import ConfigError


def _require(ok: bool, field: str, message: str):
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


def _require_choice(value, choices, field: str):
    _require(value in choices, field, f"unknown {value!r}; choose one of {tuple(choices)}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks that a config can work, before anything is built. Raises ValueError naming the
    field (one line) on the first problem."""
    d, m, f, o, t, s = (
        config.data,
        config.model,
        config.diffusion,
        config.optim,
        config.training,
        config.sampling,
    )
    _require_choice(f.schedule, schedules.SCHEDULES, "diffusion.schedule")
    _require(f.num_timesteps >= 1, "diffusion.num_timesteps", "must be >= 1")
    _validate_sampler(config)
    _require_choice(f.loss_type, losses.LOSS_TYPES, "diffusion.loss_type")
    _require_choice(f.loss_weighting, losses.WEIGHTINGS, "diffusion.loss_weighting")
    learned = f.variance.startswith("learned")
    _require(
        m.learn_sigma == learned,
        "model.learn_sigma",
        f"must be {learned} for diffusion.variance={f.variance!r}",
    )
    _require_choice(m.dtype, DTYPES, "model.dtype")
    _require(
        m.attention in ("dot_product_attention", "einsum"),
        "model.attention",
        "choose 'dot_product_attention' or 'einsum'",
    )
    _require_choice(t.objective, OBJECTIVES, "training.objective")
    _require_choice(config.eval.export_format, EXPORT_FORMATS, "eval.export_format")
    _require(
        config.eval.export_format != "diffusers" or bool(t.init_from),
        "eval.export_format",
        "'diffusers' writes a pipeline folder of a run fine-tuned from training.init_from",
    )
    _require_choice(m.context_source, ("class", "text"), "model.context_source")
    _require(
        not t.train_text_encoder or (bool(t.init_from) and is_text_conditioned(config)),
        "training.train_text_encoder",
        "trains the text encoder of a pipeline folder: set training.init_from to one",
    )
    a = config.autoencoder
    if t.objective == "autoencoder" or is_latent(config):
        factor = 2 ** (len(a.ch_mult) - 1)
        _require(
            d.image_size % factor == 0,
            "data.image_size",
            f"{d.image_size} is not divisible by 2^(len(autoencoder.ch_mult) - 1) = {factor}",
        )
        _require_choice(a.reconstruction, ("l1", "mse"), "autoencoder.reconstruction")
        ae_channels = {a.ch * k for k in a.ch_mult}
        _require(
            all(c % a.norm_groups == 0 for c in ae_channels),
            "autoencoder.norm_groups",
            f"{a.norm_groups} groups do not divide the channel counts {sorted(ae_channels)}",
        )
    _require(
        not is_text_conditioned(config) or m.context_length >= 1,
        "model.context_length",
        "must be >= 1 for a text context",
    )
    if is_latent(config):
        _require(
            "bpd" not in config.eval.metrics,
            "eval.metrics",
            "bpd is a pixel-space bound; latent diffusion has none here",
        )
        _require(
            not s.clip_denoised,
            "sampling.clip_denoised",
            "must be False for latent diffusion (latents are not in [-1, 1])",
        )
    _require_choice(m.arch, ARCHS, "model.arch")
    if t.objective == "diffusion":
        _validate_conditioning(config)
    if m.arch == "dit":
        if t.objective == "diffusion":
            _validate_dit(config)
    else:
        _validate_unet_shape(config)
    _require(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    _require(m.downsample_padding in (0, 1), "model.downsample_padding", "must be 0 or 1")
    _require(
        not m.class_conditional or d.num_classes > 0,
        "data.num_classes",
        "must be > 0 for model.class_conditional",
    )
    _require(o.optimizer in ("adam", "adamw"), "optim.optimizer", "choose 'adam' or 'adamw'")
    _require(o.decay in ("constant", "cosine"), "optim.decay", "choose 'constant' or 'cosine'")
    _require(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    _validate_ema_profiles(config)
    _require(t.grad_accum >= 1, "training.grad_accum", "must be >= 1")
    _require(
        t.batch_size % t.grad_accum == 0,
        "training.batch_size",
        f"{t.batch_size} is not divisible by training.grad_accum={t.grad_accum}",
    )
    for name in ("log_every", "ckpt_every", "sample_every"):
        _require(t[name] >= 1, f"training.{name}", "must be >= 1")
    _validate_ranges(config)
    if num_devices is not None:
        data, fsdp, _ = mesh_shape(config, num_devices)
        per_step = t.batch_size // t.grad_accum
        _require(
            per_step % (data * fsdp) == 0,
            "training.batch_size",
            f"the micro-batch {per_step} is not divisible by the {data * fsdp} batch shards "
            f"of the mesh (mesh.data x mesh.fsdp = {data} x {fsdp})",
        )


def _validate_ema_profiles(config) -> None:
    """Power-function EMA widths in (0, 1/sqrt(12)), distinct; snapshots need profiles."""
    o, t, e = config.optim, config.training, config.eval
    top = ema.MAX_SIGMA_REL
    for field, values in (
        ("optim.ema_sigma_rels", tuple(o.ema_sigma_rels)),
        ("eval.ema_sigma_rels", tuple(e.ema_sigma_rels)),
    ):
        bad = [v for v in values if not 0.0 < v < top]
        _require(not bad, field, f"{bad[0] if bad else ''} is not in (0, {top:.4f})")
        _require(len(set(values)) == len(values), field, f"{values} repeats a width")
    _require(
        e.ema_sigma_rel == 0.0 or 0.0 < e.ema_sigma_rel < top,
        "eval.ema_sigma_rel",
        f"must be 0 (the exponential EMA) or in (0, {top:.4f}), not {e.ema_sigma_rel!r}",
    )
    _at_least(t.ema_snapshot_every, 0, "training.ema_snapshot_every")
    _require(
        not t.ema_snapshot_every or o.ema_sigma_rels,
        "training.ema_snapshot_every",
        "snapshots need power-function EMA profiles: set optim.ema_sigma_rels, e.g. (0.05, 0.1)",
    )


def _validate_unet_shape(config) -> None:
    """The model input halves len(model.ch_mult) - 1 times; group norms divide the widths."""
    m = config.model
    size, _ = model_input_shape(config)
    downsamples = 2 ** (len(m.ch_mult) - 1)
    _require(
        size % downsamples == 0,
        "data.image_size",
        f"the model input size {size} is not divisible by 2^(len(model.ch_mult) - 1) = "
        f"{downsamples}",
    )
    channels = {m.ch * k for k in m.ch_mult}
    autoencoder = config.training.objective == "autoencoder"
    _require(
        autoencoder or all(c % m.norm_groups == 0 for c in channels),
        "model.norm_groups",
        f"{m.norm_groups} groups do not divide the channel counts {sorted(channels)} "
        "(model.ch * model.ch_mult)",
    )


def _validate_dit(config) -> None:
    """Patches tile the model input; heads split the width; 2-D sin-cos needs width % 4 == 0;
    no cross-attention; guidance needs the null label row (training.cond_drop_prob > 0)."""
    m, dt = config.model, config.model.dit
    size, _ = model_input_shape(config)
    for field in ("patch_size", "hidden_size", "depth", "num_heads"):
        _at_least(dt[field], 1, f"model.dit.{field}")
    _require(dt.mlp_ratio > 0, "model.dit.mlp_ratio", f"must be > 0, not {dt.mlp_ratio!r}")
    _require(
        size % dt.patch_size == 0,
        "model.dit.patch_size",
        f"{dt.patch_size} does not divide the model input size {size}",
    )
    _require(
        dt.hidden_size % 4 == 0 and dt.hidden_size % dt.num_heads == 0,
        "model.dit.hidden_size",
        f"{dt.hidden_size} must be divisible by 4 and by model.dit.num_heads={dt.num_heads}",
    )
    _require(dt.freq_shift in (0.0, 1.0), "model.dit.freq_shift", "must be 0 or 1")
    _require(dt.mlp_norm_eps > 0, "model.dit.mlp_norm_eps", "must be > 0")
    _require(m.context_dim == 0, "model.context_dim", "must be 0 for model.arch='dit'")
    _require(
        not (m.class_conditional and config.sampling.guidance_scale >= 0)
        or config.training.cond_drop_prob > 0,
        "training.cond_drop_prob",
        "must be > 0 for guidance with model.arch='dit' (the null label's row)",
    )


def _validate_conditioning(config) -> None:
    """Sampling settings that need a conditional model are refused where they would be
    ignored: guidance without labels or text, a prompt without a text encoder, and guidance
    against a null label the U-Net never learned (no dropped labels; w = 1 never uses it)."""
    m, s, t = config.model, config.sampling, config.training
    text = is_text_conditioned(config)
    w = s.guidance_scale
    _require(
        w < 0 or m.class_conditional or text,
        "sampling.guidance_scale",
        f"{w:g} guides between labels, but the model is unconditional "
        "(model.class_conditional=False, no text context): leave it < 0",
    )
    _require(
        not s.prompt or text,
        "sampling.prompt",
        "the model takes no text (it needs model.context_dim > 0 and "
        "model.context_source='text'); class-conditional models sample one row per label",
    )
    _require(
        m.arch != "unet" or not m.class_conditional or w < 0 or w == 1.0 or t.cond_drop_prob > 0,
        "training.cond_drop_prob",
        f"must be > 0 for guidance {w:g}: the null label is learned from dropped labels "
        "(or sample at sampling.guidance_scale=1, the conditional model)",
    )


def _validate_sampler(config) -> None:
    """The sampler options of config.sampling and config.diffusion, by the one copy of the
    rules (`SamplerSettings.check`), each error naming its config field (`SAMPLER_FIELDS`).
    Unset scheduler fields take the project's defaults; a pipeline folder's (read later,
    `resolved_sampling`) are unknown here but for its conventions, diffusers'."""
    implied = {"conventions": "diffusers"} if config.pretrained else None
    settings = sample_settings(config, resolved_sampling(config, implied))
    try:
        settings.check(config.diffusion.num_timesteps)
    except SettingError as e:
        raise ConfigError(f"config.{SAMPLER_FIELDS[e.option]}: {e.text}") from None


def _at_least(value, low, field: str):
    _require(value >= low, field, f"must be >= {low}, not {value!r}")


def _validate_ranges(config) -> None:
    """Positive sizes and counts, non-negative rates and probabilities in [0, 1], attention at
    resolutions the model has, evaluation metrics that exist."""
    d, m, o, t, s, e = (
        config.data,
        config.model,
        config.optim,
        config.training,
        config.sampling,
        config.eval,
    )
    for field, value in (
        ("data.image_size", d.image_size),
        ("data.channels", d.channels),
        ("model.ch", m.ch),
        ("model.num_res_blocks", m.num_res_blocks),
        ("model.num_heads", m.num_heads),
        ("model.norm_groups", m.norm_groups),
        ("training.batch_size", t.batch_size),
        ("training.num_steps", t.num_steps),
        ("training.max_to_keep", t.max_to_keep),
        ("training.max_consecutive_nonfinite", t.max_consecutive_nonfinite),
        ("sampling.num_samples", s.num_samples),
        ("sampling.batch_size", s.batch_size),
        ("eval.num_samples", e.num_samples),
        ("eval.bpd_num_examples", e.bpd_num_examples),
    ):
        _at_least(value, 1, field)
    for field, value in (
        ("data.num_classes", d.num_classes),
        ("optim.lr", o.lr),
        ("optim.warmup_steps", o.warmup_steps),
        ("optim.weight_decay", o.weight_decay),
        ("training.eval_every", t.eval_every),
    ):
        _at_least(value, 0, field)
    _at_least(e.checkpoint_step, -1, "eval.checkpoint_step")
    _require(o.eps > 0, "optim.eps", f"must be > 0, not {o.eps!r}")
    for field, value in (
        ("optim.beta1", o.beta1),
        ("optim.beta2", o.beta2),
        ("training.cond_drop_prob", t.cond_drop_prob),
    ):
        _require(0.0 <= value < 1.0, field, f"must be in [0, 1), not {value!r}")
    _require(
        len(m.ch_mult) >= 1 and all(k >= 1 for k in m.ch_mult),
        "model.ch_mult",
        f"must be one or more positive multipliers, not {tuple(m.ch_mult)}",
    )
    if t.objective == "diffusion" and m.arch == "unet":
        size, _ = model_input_shape(config)
        resolutions = tuple(size // 2**i for i in range(len(m.ch_mult)))
        missing = sorted(set(m.attn_resolutions) - set(resolutions))
        _require(
            not missing,
            "model.attn_resolutions",
            f"{missing[0] if missing else ''} is not a resolution of this U-Net; it has "
            f"{resolutions} (model input {size} halved per level of model.ch_mult)",
        )
    unknown = sorted(set(e.metrics) - set(EVAL_METRICS))
    _require(
        not unknown,
        "eval.metrics",
        f"unknown {unknown[0] if unknown else ''!r}; choose from {EVAL_METRICS}",
    )


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from config.mesh; a -1 takes all devices the others leave."""
    sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    _require(
        len(free) <= 1,
        "mesh",
        f"only one axis may be -1, not {' and '.join(f'mesh.{a}' for a in free)}",
    )
    for axis, size in sizes.items():
        _require(size == -1 or size >= 1, f"mesh.{axis}", f"must be >= 1 or -1, not {size!r}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        _require(
            num_devices % fixed == 0,
            f"mesh.{free[0]}",
            f"-1 takes the devices the other axes leave, but their product {fixed} does not "
            f"divide the {num_devices} devices",
        )
        sizes[free[0]] = num_devices // fixed
    _require(
        math.prod(sizes.values()) == num_devices,
        "mesh",
        "mesh.data x mesh.fsdp x mesh.tensor = "
        f"{' x '.join(str(v) for v in sizes.values())} != {num_devices} devices",
    )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]
