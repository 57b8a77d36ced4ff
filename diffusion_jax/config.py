"""The base config every recipe in configs/ starts from, and its validation.

Each field is documented where it is defined; recipes change only what differs. `validate`
runs before anything is compiled and fails with one line naming the field and the fix. The
helpers recipes are built from (parse_arg, smoke, ddpm_recipe, improved_recipe) live in
diffusion_jax/recipes.py.
"""

from __future__ import annotations

import ml_collections

from diffusion_jax.diffusion import losses, process, samplers, schedules


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.data = d = ml_collections.ConfigDict()
    d.dataset = "digits"  # a tfds name, "digits", "folder" or "synthetic"
    d.image_size = 16
    d.channels = 1
    d.num_classes = 10  # used when model.class_conditional
    d.data_dir = ""  # tfds data_dir, or the image folder for dataset="folder"
    d.train_split = "train"
    d.eval_split = "test"
    d.random_flip = False
    d.download = False  # tfds download_and_prepare when the data set is missing
    d.dequantize = False  # uniform dequantization of 8-bit pixels in training (likelihood)
    d.shuffle_buffer = 10_000
    # Latent diffusion: the directory of latent shards (`--mode=encode` writes them, a
    # latent run encodes them once when missing); "" means <workdir>/latents.
    d.latents = ""

    c.model = m = ml_collections.ConfigDict()
    m.ch = 32
    m.ch_mult = (1, 2)
    m.num_res_blocks = 1
    m.attn_resolutions = (8,)
    m.dropout = 0.0
    m.num_heads = 1
    m.head_channels = -1  # > 0: heads of this many channels, overriding num_heads
    m.scale_shift_norm = False
    m.resblock_updown = False
    m.downsample_padding = 0  # 0: TF SAME padding as DDPM; 1: symmetric as improved DDPM
    m.flip_sin_to_cos = False  # timestep embedding: DDPM sin-first, freq shift 1
    m.freq_shift = 1.0
    m.norm_groups = 32
    m.norm_eps = 1e-6
    m.learn_sigma = False  # doubles the output channels; needs a learned diffusion.variance
    m.class_conditional = False
    m.attention = "dot_product_attention"  # or "einsum"
    m.mid_attn_norm = True  # False only for diffusers' scale-shift models, which lack it
    m.remat = False
    m.dtype = "float32"  # activations; parameters are always float32
    # Cross-attention (latent diffusion's spatial transformers) when context_dim > 0.
    m.context_dim = 0
    m.context_source = "class"  # "class": a learned one-token context per label; "text"
    m.context_length = 77  # tokens of a "text" context (precomputed embeddings in the data)
    m.transformer_depth = 1
    m.linear_projection = False  # Dense proj_in/out (SD v2) instead of 1x1 convs (SD v1)

    # The KL autoencoder of latent diffusion: trained with training.objective="autoencoder";
    # a diffusion run with autoencoder.weights set works in its latent space.
    c.autoencoder = a = ml_collections.ConfigDict()
    a.weights = ""  # autoencoder workdir, exported .msgpack, or diffusers AutoencoderKL folder
    a.ch = 128
    a.ch_mult = (1, 2, 4, 4)
    a.num_res_blocks = 2
    a.latent_channels = 4
    a.norm_groups = 32
    a.norm_eps = 1e-6
    a.mid_attention = True
    a.scaling_factor = 0.18215  # latents are scaled by it for the diffusion model
    a.kl_weight = 1e-6
    a.reconstruction = "l1"  # or "mse"

    # CLIP's text transformer: Stable Diffusion's (read from `pretrained`), or the one that
    # turns captions into contexts at --mode=encode and prompts into contexts at sampling
    # for "text" models: `weights` is a folder holding text_encoder/ and tokenizer/.
    c.text_encoder = te = ml_collections.ConfigDict()
    te.weights = ""
    te.vocab_size = 49408
    te.width = 768
    te.num_layers = 12
    te.num_heads = 12
    te.mlp_dim = 3072
    te.max_length = 77
    te.activation = "quick_gelu"
    te.eps = 1e-5

    # A diffusers pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) whose
    # weights --mode=sample uses; its config.json files replace model/autoencoder/text_encoder.
    c.pretrained = ""

    c.diffusion = f = ml_collections.ConfigDict()
    f.schedule = "linear"
    f.num_timesteps = 1000
    f.beta_start = -1.0  # < 0: the schedule's published value
    f.beta_end = -1.0
    f.prediction = "eps"
    f.variance = "fixed_large"
    f.loss_type = "mse"
    f.loss_weighting = "none"
    f.min_snr_gamma = 5.0

    c.optim = o = ml_collections.ConfigDict()
    o.optimizer = "adam"  # or "adamw"
    o.lr = 2e-4
    o.beta1 = 0.9
    o.beta2 = 0.999
    o.eps = 1e-8
    o.weight_decay = 0.0
    o.warmup_steps = 5000
    o.decay = "constant"  # or "cosine" (to 0 at training.num_steps)
    o.grad_clip = 1.0  # global-norm clipping; <= 0 disables
    o.ema_decay = 0.9999
    o.ema_warmup = False  # decay min(ema_decay, (1 + step) / (10 + step))

    c.training = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global, over all devices and hosts
    t.num_steps = 800_000
    t.seed = 0
    t.grad_accum = 1  # micro-batches per step (a scan; unrolled on CPU, where it runs faster)
    t.cond_drop_prob = 0.1  # label dropout for classifier-free guidance (conditional models)
    t.max_consecutive_nonfinite = 10
    t.log_every = 100
    t.ckpt_every = 5000
    t.sample_every = 10_000
    t.eval_every = 0  # 0: no evaluation during training
    t.eval_at_end = False  # --mode=train also runs --mode=eval when it finishes
    t.max_to_keep = 3
    t.allow_config_change = False
    t.objective = "diffusion"  # or "autoencoder" (trains config.autoencoder on data)

    c.sampling = s = ml_collections.ConfigDict()
    s.sampler = "ddim"  # ddpm, ddim, dpm_solver++ (2M), dpm_solver++_sde, dpm_solver++_3m,
    # unipc, euler, heun (EDM, Karras sigmas)
    s.num_steps = 50  # network evaluations (NFE) for every sampler
    s.spacing = ""  # "" uses the sampler's default spacing
    # Explicit descending timesteps, overriding num_steps and spacing; e.g. diffusers'
    # "leading" spacing of Stable Diffusion's scheduler (steps_offset=1) for 5 steps is
    # (801, 601, 401, 201, 1).
    s.timesteps = ()
    s.eta = 0.0
    s.s_churn = 0.0  # euler/heun: EDM's stochastic churn (0: the deterministic ODE)
    s.s_noise = 1.0  # euler/heun: the churn noise's scale
    s.unipc_variant = "bh2"  # unipc: B(h) = e^h - 1 ("bh2") or h ("bh1")
    s.num_samples = 64
    s.guidance_scale = -1.0  # < 0: no guidance
    s.clip_denoised = True
    s.batch_size = 256
    s.prompt = ""  # text-conditioned models: the prompt of every sample
    s.negative_prompt = ""  # the unconditional side of guidance

    c.eval = e = ml_collections.ConfigDict()
    e.num_samples = 1000
    e.metrics = ("digits_fd",)
    e.reference_stats = ""
    e.checkpoint_step = -1  # -1: every checkpoint without a result
    e.inception_weights = ""
    e.bpd_num_examples = 256
    e.params_file = ""  # an exported .msgpack to evaluate instead of the workdir's checkpoints

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left after the other axes
    c.mesh.fsdp = 1
    return c


DTYPES = ("float32", "bfloat16")
OBJECTIVES = ("diffusion", "autoencoder")
EVAL_METRICS = ("digits_fd", "bpd", "fid", "is", "precision", "recall", "reconstruction")
INCEPTION_METRICS = ("fid", "is", "precision", "recall")  # need eval.inception_weights
REFERENCE_METRICS = ("fid", "precision", "recall")  # need eval.reference_stats


def is_latent(config) -> bool:
    """A diffusion run in the latent space of a trained autoencoder."""
    return config.training.objective == "diffusion" and bool(
        config.autoencoder.weights or config.pretrained
    )


def is_text_conditioned(config) -> bool:
    """A U-Net cross-attending to text contexts (precomputed embeddings or prompts)."""
    return config.model.context_dim > 0 and config.model.context_source == "text"


def model_input_shape(config) -> tuple[int, int]:
    """(size, channels) of what the trained network sees: the images, or their latents
    (size / 2^(len(autoencoder.ch_mult) - 1), autoencoder.latent_channels)."""
    d, a = config.data, config.autoencoder
    if is_latent(config):
        return d.image_size // 2 ** (len(a.ch_mult) - 1), a.latent_channels
    return d.image_size, d.channels


class ConfigError(ValueError):
    """A config that cannot work; the message names the field and the fix, in one line."""


def first_line(error: BaseException, *, named: bool = False, limit: int | None = None) -> str:
    """An exception as one line: the first line of its message (a KeyError's key without
    quotes, a TensorStore error without the array spec it appends), cut to `limit`
    characters, after its type name when `named`; the type name when the message is empty."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = text.split(" See full TensorStore details")[0].strip().splitlines()
    if not lines:
        return type(error).__name__
    line = lines[0][:limit] if limit else lines[0]
    return f"{type(error).__name__}: {line}" if named else line


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
    _require_choice(f.prediction, process.PREDICTIONS, "diffusion.prediction")
    _require_choice(f.variance, process.VARIANCES, "diffusion.variance")
    _require_choice(f.loss_type, losses.LOSS_TYPES, "diffusion.loss_type")
    _require_choice(f.loss_weighting, losses.WEIGHTINGS, "diffusion.loss_weighting")
    learned = f.variance.startswith("learned")
    _require(
        m.learn_sigma == learned,
        "model.learn_sigma",
        f"must be {learned} for diffusion.variance={f.variance!r}",
    )
    _require_choice(s.sampler, samplers.SAMPLERS, "sampling.sampler")
    _require(
        s.spacing in ("",) + samplers.SPACINGS,
        "sampling.spacing",
        f"unknown {s.spacing!r}; choose one of {samplers.SPACINGS}",
    )
    _require(
        not s.spacing or s.sampler not in ("euler", "heun"),
        "sampling.spacing",
        f"{s.sampler} steps over Karras sigmas; leave sampling.spacing empty",
    )
    _require_choice(s.unipc_variant, ("bh1", "bh2"), "sampling.unipc_variant")
    _require(s.s_churn >= 0 and s.s_noise >= 0, "sampling.s_churn", "s_churn, s_noise >= 0")
    steps = list(s.timesteps)
    _require(
        all(0 <= a < f.num_timesteps for a in steps) and steps == sorted(set(steps), reverse=True),
        "sampling.timesteps",
        f"must be distinct, descending and in [0, diffusion.num_timesteps={f.num_timesteps})",
    )
    _require(
        1 <= s.num_steps <= f.num_timesteps,
        "sampling.num_steps",
        f"must be in [1, diffusion.num_timesteps={f.num_timesteps}]",
    )
    _require_choice(m.dtype, DTYPES, "model.dtype")
    _require(
        m.attention in ("dot_product_attention", "einsum"),
        "model.attention",
        "choose 'dot_product_attention' or 'einsum'",
    )
    _require_choice(t.objective, OBJECTIVES, "training.objective")
    _require_choice(m.context_source, ("class", "text"), "model.context_source")
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
    size, _ = model_input_shape(config)
    downsamples = 2 ** (len(m.ch_mult) - 1)
    _require(
        size % downsamples == 0,
        "data.image_size",
        f"the model input size {size} is not divisible by 2^(len(model.ch_mult) - 1) = "
        f"{downsamples}",
    )
    channels = {m.ch * k for k in m.ch_mult}
    _require(
        t.objective == "autoencoder" or all(c % m.norm_groups == 0 for c in channels),
        "model.norm_groups",
        f"{m.norm_groups} groups do not divide the channel counts {sorted(channels)} "
        "(model.ch * model.ch_mult)",
    )
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
        sizes = mesh_shape(config, num_devices)
        per_step = t.batch_size // t.grad_accum
        _require(
            per_step % (sizes[0] * sizes[1]) == 0,
            "training.batch_size",
            f"the micro-batch {per_step} is not divisible by the {sizes[0] * sizes[1]} "
            "devices of the mesh (mesh.data x mesh.fsdp)",
        )


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
        ("sampling.eta", s.eta),
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
    if t.objective == "diffusion":
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


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes from config.mesh; a -1 takes all devices the other axis leaves."""
    sizes = {"data": config.mesh.data, "fsdp": config.mesh.fsdp}
    free = [axis for axis, size in sizes.items() if size == -1]
    _require(len(free) <= 1, "mesh", "only one of mesh.data, mesh.fsdp may be -1")
    if free:
        (fixed,) = set(sizes) - set(free)
        _require(
            sizes[fixed] >= 1 and num_devices % sizes[fixed] == 0,
            f"mesh.{fixed}",
            f"{sizes[fixed]} does not divide the {num_devices} devices",
        )
        sizes[free[0]] = num_devices // sizes[fixed]
    _require(
        sizes["data"] * sizes["fsdp"] == num_devices,
        "mesh",
        f"mesh.data x mesh.fsdp = {sizes['data']} x {sizes['fsdp']} != {num_devices} devices",
    )
    return sizes["data"], sizes["fsdp"]
