"""The helpers the recipes in configs/ are built from: the `--config=FILE:ARG` options, the
`smoke` shrink to a CPU run of a few seconds, the published DDPM and improved DDPM setups,
DiT's model sizes, the digits runs' shared setup and Stable Diffusion's sampling section.
"""

from __future__ import annotations

import ml_collections

from diffusion_jax.errors import ConfigError

# DiT's published sizes (Peebles & Xie 2023, Table 1): name -> (depth, hidden size, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def parse_arg(arg: str, allowed: tuple[str, ...]) -> set[str]:
    """The comma-separated options of `--config=FILE:ARG`, each checked against `allowed`."""
    options = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = options - set(allowed)
    if unknown:
        raise ConfigError(f"config arg: unknown option(s) {sorted(unknown)}; choose from {allowed}")
    return options


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a recipe to a run of a few seconds on a CPU: a tiny U-Net at 16x16 (or the
    recipe's size if smaller), a batch of 8 and 2 steps; everything else as the recipe."""
    c.data.image_size = min(c.data.image_size, 16)
    # The shuffle buffer holds examples before they are resized: 10,000 of them would take
    # longer to fill (and, at 256 px, 2 GB) than the whole smoke run.
    c.data.shuffle_buffer = min(c.data.shuffle_buffer, 64)
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.norm_groups = 8, (1, 2), 1, 4
    m.attn_resolutions = (c.data.image_size // 2,)
    m.head_channels = -1
    m.num_heads = 1
    # A DiT (model.arch="dit") as small: 2 blocks of width 16 in 2 heads over 2x2 patches.
    m.dit.update(patch_size=2, hidden_size=16, depth=2, num_heads=2)
    t = c.training
    t.batch_size, t.num_steps, t.grad_accum = 8, 2, 1
    t.log_every = t.ckpt_every = t.sample_every = 1
    c.sampling.num_steps = min(c.sampling.num_steps, 4)
    c.sampling.num_samples = 8
    c.sampling.batch_size = 8
    c.eval.num_samples = 16
    c.eval.bpd_num_examples = 8
    c.diffusion.num_timesteps = min(c.diffusion.num_timesteps, 100)
    c.optim.warmup_steps = 1
    return c


def ddpm_recipe(c, *, image_size: int, ch_mult, attn_resolutions=(16,), dropout=0.1):
    """The DDPM setup of Ho et al. (App. B): the U-Net with ch=128, two residual blocks per
    level and attention at 16x16; linear betas over T=1000, eps prediction, fixed_large
    variance; Adam with warm-up, clipping at 1 and an EMA of 0.9999; ancestral sampling."""
    c.data.image_size, c.data.channels = image_size, 3
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks = 128, tuple(ch_mult), 2
    m.attn_resolutions, m.dropout, m.norm_groups = tuple(attn_resolutions), dropout, 32
    f = c.diffusion
    f.schedule, f.num_timesteps, f.prediction, f.variance = "linear", 1000, "eps", "fixed_large"
    f.loss_type = "mse"
    o = c.optim
    o.optimizer, o.lr, o.warmup_steps, o.grad_clip, o.ema_decay = "adam", 2e-4, 5000, 1.0, 0.9999
    o.decay = "constant"
    c.sampling.sampler, c.sampling.num_steps = "ddpm", 1000
    c.eval.metrics = ("fid", "is")
    c.eval.num_samples = 50_000
    return c


def improved_recipe(
    c,
    *,
    image_size: int,
    ch_mult,
    attn_resolutions,
    num_res_blocks=3,
    dropout=0.0,
    num_timesteps=4000,
):
    """Improved DDPM (Nichol & Dhariwal 2021): cosine schedule, learned_range variance with
    the hybrid loss, scale-shift norm, 4 attention heads, PyTorch-style padding and a cos-first
    timestep embedding; Adam at 1e-4 without warm-up."""
    ddpm_recipe(
        c,
        image_size=image_size,
        ch_mult=ch_mult,
        attn_resolutions=attn_resolutions,
        dropout=dropout,
    )
    m = c.model
    m.num_res_blocks, m.num_heads, m.scale_shift_norm, m.learn_sigma = num_res_blocks, 4, True, True
    m.downsample_padding, m.flip_sin_to_cos, m.freq_shift = 1, True, 0.0
    f = c.diffusion
    f.schedule, f.num_timesteps, f.variance, f.loss_type = (
        "cosine",
        num_timesteps,
        "learned_range",
        "hybrid",
    )
    c.optim.lr, c.optim.warmup_steps = 1e-4, 0
    # Improved DDPM's learned variances keep FID with 100 respaced ancestral steps.
    c.sampling.sampler, c.sampling.num_steps = "ddpm", 100
    return c


def dit_model(c, name: str) -> ml_collections.ConfigDict:
    """model.arch="dit" at one of the paper's sizes, named "<S|B|L|XL>/<patch>" (e.g. "XL/2"):
    depth, width and heads from DIT_SIZES, MLP ratio 4, the shared embedder."""
    size, _, patch = name.partition("/")
    if size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise ConfigError(f"model.dit: unknown DiT {name!r}; choose <S|B|L|XL>/<2|4|8>")
    depth, hidden, heads = DIT_SIZES[size]
    c.model.arch = "dit"
    c.model.dit.update(
        patch_size=int(patch),
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        per_block_embedders=False,
    )
    return c


def digits_recipe(c, options) -> ml_collections.ConfigDict:
    """Everything of the embedded digits runs (configs/digits.py, digits_dit.py) but the
    network: 16x16 digits, the cosine schedule, min-SNR-5 loss weighting, Adam with warm-up
    and cosine decay, an EMA, 1,200 steps of 64 images, and digits_fd at the end.

    The model is class-conditional with 10% label dropout and samples each digit with
    DPM-Solver++(2M) SDE in 50 network evaluations at guidance 1 (the conditional model;
    one evaluation per step): of what benchmarks/sampler_quality.py and the default's
    measurements in benchmarks/README.md compared, the best digits_fd within the budget
    of about ten minutes. `cond` samples with guidance 2 (surer, less varied digits),
    `uncond` trains and samples without labels."""
    c.data.dataset, c.data.image_size, c.data.channels, c.data.num_classes = "digits", 16, 1, 10
    c.diffusion.schedule, c.diffusion.num_timesteps = "cosine", 1000
    c.diffusion.loss_weighting = "min_snr"
    o = c.optim
    o.lr, o.warmup_steps, o.decay, o.ema_decay, o.ema_warmup = 1e-3, 200, "cosine", 0.999, True
    t = c.training
    t.batch_size = 64
    # 1.7-2.7 steps/s on 2 CPU cores (machines differ): 8-12 minutes, then ~1 minute of
    # evaluation.
    t.num_steps = 1200
    t.log_every = 100
    t.ckpt_every = 400
    t.sample_every = 400
    t.eval_at_end = True
    c.model.class_conditional, t.cond_drop_prob = True, 0.1
    s = c.sampling
    s.sampler, s.num_steps, s.num_samples, s.guidance_scale = "dpm_solver++_sde", 50, 100, 1.0
    c.eval.num_samples = 500
    # bpd is available (--config.eval.metrics='("digits_fd","bpd")'), at 1,000 network
    # evaluations per batch.
    c.eval.metrics = ("digits_fd",)
    if "cond" in options:
        s.guidance_scale = 2.0
    if "uncond" in options:
        c.model.class_conditional, t.cond_drop_prob, s.guidance_scale = False, 0.0, -1.0
    return c


def text_to_image_sampling(c, options) -> ml_collections.ConfigDict:
    """Stable Diffusion's sampling section: DDIM in 50 steps at guidance 7.5, four images of
    one prompt; `dpm` takes DPM-Solver++(2M) in 25 steps, `euler` Euler in 30."""
    s = c.sampling
    s.sampler, s.num_steps, s.eta = "ddim", 50, 0.0
    s.guidance_scale = 7.5
    s.num_samples, s.batch_size = 4, 4
    s.prompt = "a photograph of an astronaut riding a horse"
    s.negative_prompt = ""
    if "dpm" in options:
        s.sampler, s.num_steps = "dpm_solver++", 25
    if "euler" in options:
        s.sampler, s.num_steps = "euler", 30
    return c
