"""The base config every recipe in configs/ starts from, and its validation.

Each field is documented where it is defined; recipes change only what differs. `validate`
runs before anything is compiled and fails with one line naming the field and the fix. The
helpers recipes are built from (parse_arg, smoke, ddpm_recipe, improved_recipe) live in
diffusion_jax/recipes.py.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


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
    # "unet": the U-Net below (ch ... linear_projection); "dit": the Diffusion Transformer of
    # model.dit. learn_sigma, class_conditional, dropout, attention, remat and dtype apply
    # to both; the DiT's label dropout is training.cond_drop_prob.
    m.arch = "unet"
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
    # The DiT (Peebles & Xie 2023) when model.arch="dit": S/B/L/XL are (depth, hidden_size,
    # num_heads) = (12, 384, 6), (12, 768, 12), (24, 1024, 16), (28, 1152, 16), patch 2/4/8
    # (recipes.dit_model). Its label table has a null row when training.cond_drop_prob > 0.
    m.dit = dt = ml_collections.ConfigDict()
    dt.patch_size = 2  # must divide the model input size
    dt.hidden_size = 384  # divisible by 4 (2-D sin-cos positions) and by num_heads
    dt.depth = 12
    dt.num_heads = 6
    dt.mlp_ratio = 4.0
    # True: a timestep-and-label embedder in every block (diffusers' DiTTransformer2DModel
    # layout); False: one shared by all blocks (the original DiT).
    dt.per_block_embedders = False
    # Timestep features w_i = 10000^(-i / (128 - freq_shift)): 0 in the original DiT, 1 in
    # diffusers' port (which its imported weights are evaluated with).
    dt.freq_shift = 0.0
    dt.mlp_norm_eps = 1e-6  # the MLP's LayerNorm (diffusers' port: 1e-5)

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
    # Power-function EMA profiles (EDM2) tracked beside the exponential EMA, by their width
    # relative to the training time, e.g. (0.05, 0.10); snapshots of them every
    # training.ema_snapshot_every steps let --mode=posthoc_ema rebuild any other width.
    o.ema_sigma_rels = ()

    c.training = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global, over all devices and hosts
    t.num_steps = 800_000
    t.seed = 0
    t.grad_accum = 1  # micro-batches per step (a scan; unrolled on CPU, where it runs faster)
    # Label (or caption) dropout for classifier-free guidance (conditional models); a
    # dropped caption of a run fine-tuned from a pipeline folder is the empty prompt's.
    t.cond_drop_prob = 0.1
    t.max_consecutive_nonfinite = 10
    t.log_every = 100
    t.ckpt_every = 5000
    t.sample_every = 10_000
    t.eval_every = 0  # 0: no evaluation during training
    t.eval_at_end = False  # --mode=train also runs --mode=eval when it finishes
    t.max_to_keep = 3
    # Snapshots of the optim.ema_sigma_rels profiles in <workdir>/ema_snapshots/, all kept;
    # 0: none (--mode=posthoc_ema then has only the final profiles to combine).
    t.ema_snapshot_every = 0
    t.allow_config_change = False
    t.objective = "diffusion"  # or "autoencoder" (trains config.autoencoder on data)
    # Fine-tuning: a diffusers pipeline folder whose U-Net starts the run. Its config.json
    # files replace the model, diffusion, autoencoder and text_encoder sections and the image
    # size; its vae/ encodes the images and its text_encoder/ the captions.
    t.init_from = ""
    # Train the pipeline's text encoder with the U-Net (same optimizer, EMA and checkpoints;
    # the shards then hold caption tokens, encoded inside the step). False: it stays frozen
    # and the captions are encoded once, at --mode=encode.
    t.train_text_encoder = False

    c.sampling = s = ml_collections.ConfigDict()
    s.sampler = "ddim"  # ddpm, ddim, dpm_solver++ (2M), dpm_solver++_sde, dpm_solver++_3m,
    # unipc, euler, heun (EDM, Karras sigmas)
    s.num_steps = 50  # network evaluations (NFE) for every sampler
    # The scheduler conventions (`dm.sample`'s arguments of the same names). Each left at its
    # "unset" value ("" or None) follows a pipeline folder's scheduler/scheduler_config.json
    # (as diffusers' class for this sampler reads it; `convert.sampling_from_scheduler`),
    # else the project's default (`resolved_sampling`); setting one overrides both.
    # uniform, quadratic, trailing, leading or linspace; default: the sampler's.
    s.spacing = ""
    s.steps_offset = placeholder(int)  # added to "leading" timesteps; default 0
    # After the last step: "zero" (the data, abar = 1) or "sigma_min" (the level of t = 0,
    # diffusers' set_alpha_to_one=False for DDIM); default "zero".
    s.final_sigmas_type = ""
    # Karras sigmas (rho = 7) instead of a spacing; default True for euler/heun, else False.
    s.use_karras_sigmas = placeholder(bool)
    # The top of the Karras grid; unset: min(sigma_{T-1}, 80). Lower it for few steps on
    # small images (digits: 10 gives Heun at 10 NFE within 1.2x of DDIM, against 1.8x).
    s.sigma_max = placeholder(float)
    s.solver_order = placeholder(int)  # dpm_solver++: 1, 2 (2M, default) or 3 (3M)
    # dpm_solver++ with < 15 steps: first order on the last step, at most 2 on the one before.
    s.lower_order_final = placeholder(bool)
    # "project" or "diffusers" (the per-scheduler habits of `timesteps.Conventions`); default
    # "diffusers" for a pipeline folder, else "project".
    s.conventions = ""
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
    # Clip the x0 predictions to [-1, 1] (clip_sample); default True in pixel space, False
    # for latents (and a folder's clip_sample).
    s.clip_denoised = placeholder(bool)
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
    # --mode=export writes "msgpack" (one file + its config) or "diffusers" (a pipeline folder
    # of a run fine-tuned from training.init_from, that diffusers' from_pretrained loads).
    e.export_format = "msgpack"
    # > 0: eval, sample and export use the power-function EMA of this width that
    # --mode=posthoc_ema rebuilt from the snapshots (or a tracked one of exactly this width).
    e.ema_sigma_rel = 0.0
    # --mode=posthoc_ema: rebuild and score each of these widths (the EMA-length curve).
    e.ema_sigma_rels = ()

    # The device mesh, outermost axis first; data x fsdp x tensor = the number of devices,
    # and one axis may be -1: the devices the others leave. The batch is split over
    # data x fsdp; parameters, EMA and Adam moments over fsdp (parallel.py).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left after the other axes
    c.mesh.fsdp = 1
    # > 1: attention heads and MLP hidden units split over this many devices (Megatron-style
    # model parallelism), for models whose state does not fit even with fsdp; a divisor of
    # the devices of one process, ideally of the heads (launch/README.md).
    c.mesh.tensor = 1
    return c


DTYPES = ("float32", "bfloat16")
ARCHS = ("unet", "dit")
MESH_AXES = ("data", "fsdp", "tensor")  # outermost first: tensor on the fastest links
OBJECTIVES = ("diffusion", "autoencoder")
EXPORT_FORMATS = ("msgpack", "diffusers")
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


# The project's defaults of the scheduler fields left unset (see base_config).
SCHEDULER_DEFAULTS = {
    "spacing": "",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "use_karras_sigmas": None,  # dm.sample's default: the sampler's
    "solver_order": None,  # dm.sample's default: the sampler's
    "lower_order_final": False,
    "conventions": "project",
}


def resolved_sampling(config, implied: dict | None = None) -> ml_collections.ConfigDict:
    """A copy of config.sampling whose unset scheduler fields ("" or None) take the value
    `implied` gives (a pipeline folder's scheduler config, read by
    `convert.sampling_from_scheduler`), else the project's default; set fields stay. The one
    place where the defaults of base_config's "unset" fields are decided."""
    implied = implied or {}
    s = ml_collections.ConfigDict(config.sampling.to_dict())
    defaults = dict(SCHEDULER_DEFAULTS, clip_denoised=not is_latent(config))
    for key, default in defaults.items():
        if s[key] is None or s[key] == "":
            value = implied.get(key, default)
            s[key] = "" if value is None and s[key] == "" else value
    return s


# The config field of each `dm.SamplerSettings` option that `sample_settings` reads (the
# field a sampler error names); s_tmin and s_tmax keep their defaults.
SAMPLER_FIELDS = {
    "sampler": "sampling.sampler",
    "num_steps": "sampling.num_steps",
    "spacing": "sampling.spacing",
    "eta": "sampling.eta",
    "timesteps": "sampling.timesteps",
    "prediction": "diffusion.prediction",
    "variance": "diffusion.variance",
    "clip_denoised": "sampling.clip_denoised",
    "guidance_scale": "sampling.guidance_scale",
    "unipc_variant": "sampling.unipc_variant",
    "s_churn": "sampling.s_churn",
    "s_noise": "sampling.s_noise",
    "steps_offset": "sampling.steps_offset",
    "final_sigmas_type": "sampling.final_sigmas_type",
    "karras_sigmas": "sampling.use_karras_sigmas",
    "sigma_max": "sampling.sigma_max",
    "solver_order": "sampling.solver_order",
    "lower_order_final": "sampling.lower_order_final",
    "conventions": "sampling.conventions",
}


def sample_settings(config, sampling=None):
    """The `dm.SamplerSettings` of a sampling section (`resolved_sampling(config)` when not
    given) and config.diffusion (`SAMPLER_FIELDS`): the sampler, its options and guidance
    (none for sampling.guidance_scale < 0, or 1: the conditional model in one evaluation);
    not the model, labels or keys."""
    from diffusion_jax.diffusion.sampler_settings import SamplerSettings

    s = sampling if sampling is not None else resolved_sampling(config)
    guidance = s.guidance_scale if s.guidance_scale >= 0 else None
    if guidance == 1.0:
        guidance = None  # w = 1 is the conditional model: one network evaluation, not two
    return SamplerSettings(
        sampler=s.sampler,
        num_steps=s.num_steps,
        spacing=s.spacing or None,
        timesteps=tuple(s.timesteps) or None,
        eta=s.eta,
        prediction=config.diffusion.prediction,
        variance=config.diffusion.variance,
        clip_denoised=bool(s.clip_denoised),
        guidance_scale=guidance,
        unipc_variant=s.unipc_variant,
        s_churn=s.s_churn,
        s_noise=s.s_noise,
        steps_offset=s.steps_offset,
        final_sigmas_type=s.final_sigmas_type,
        karras_sigmas=s.use_karras_sigmas,
        sigma_max=s.sigma_max,
        solver_order=s.solver_order,
        lower_order_final=bool(s.lower_order_final),
        conventions=s.conventions,
    )
