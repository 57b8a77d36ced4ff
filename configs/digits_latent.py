"""Latent diffusion on the embedded digits, on a CPU: a KL autoencoder, then a class-conditional
U-Net with cross-attention over its latents.

    # 1. the autoencoder: 16x16 digits <-> 4x4x4 latents (writes runs/digits_ae)
    diffusion-jax --config=configs/digits_latent.py:autoencoder --workdir=runs/digits_ae
    # 2. latent diffusion: encodes the training split once, trains, samples, scores digits_fd
    diffusion-jax --config=configs/digits_latent.py --workdir=runs/digits_ldm

Args (comma-separated): `autoencoder` trains the autoencoder instead of the diffusion model;
`smoke` shrinks both to run in seconds. Step 2 reads the autoencoder from
`autoencoder.weights` (runs/digits_ae by default; an exported .msgpack or a diffusers
AutoencoderKL folder also work). Labels reach the U-Net as a one-token cross-attention
context (latent diffusion's class conditioning); samples use classifier-free guidance.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("autoencoder", "smoke"))
    c = base_config()
    d = c.data
    d.dataset, d.image_size, d.channels, d.num_classes = "digits", 16, 1, 10

    # f = 4: 16x16x1 images <-> 4x4x4 latents, as many numbers as the 8x8 source digits.
    a = c.autoencoder
    a.weights = "runs/digits_ae"
    a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels = 32, (1, 2, 2), 1, 4
    a.norm_groups = 8
    a.kl_weight = 1e-4
    # 1 / the standard deviation of the trained autoencoder's latents (--mode=encode logs it).
    a.scaling_factor = 0.35

    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.norm_groups = 32, (1, 2), 2, (4, 2), 8
    m.class_conditional = True
    m.context_dim, m.context_source, m.num_heads = 32, "class", 2
    m.dropout = 0.1

    # Latent diffusion's schedule. Unclipped eps-prediction needs alpha_bar_T well above 0:
    # under the cosine schedule (alpha_bar_T ~ 1e-9) the first x0 estimates blow up.
    f = c.diffusion
    f.schedule, f.num_timesteps, f.beta_start, f.beta_end = "scaled_linear", 1000, 0.00085, 0.012

    o = c.optim
    o.lr, o.warmup_steps, o.decay, o.ema_decay, o.ema_warmup = 1e-3, 200, "cosine", 0.999, True

    t = c.training
    t.batch_size, t.num_steps = 64, 2000
    t.log_every, t.ckpt_every, t.sample_every = 100, 500, 500
    t.cond_drop_prob = 0.1
    t.eval_at_end = True

    s = c.sampling
    s.sampler, s.num_steps, s.num_samples, s.guidance_scale = "ddim", 50, 100, 2.0
    s.clip_denoised = False  # latents are not in [-1, 1]; decoded images are clipped

    c.eval.num_samples = 500
    c.eval.metrics = ("digits_fd",)

    if "autoencoder" in options:
        t.objective = "autoencoder"
        t.num_steps = 1000
        o.warmup_steps = 100
        t.eval_at_end = True
        c.eval.metrics = ("reconstruction",)
        c.eval.num_samples = 360
    if "smoke" in options:
        smoke(c)
        a.ch, a.norm_groups = 8, 4
        m.attn_resolutions = (4,)
        m.context_dim = 8
        m.num_heads = 1
        c.sampling.clip_denoised = False
    return c
