"""Latent diffusion on CelebA-HQ 256x256 (Rombach et al. 2022, LDM-4): a KL autoencoder with
f = 4 (256x256x3 images <-> 64x64x3 latents), then an unconditional U-Net on the latents
(ch 224, ch_mult 1,2,3,4, attention at 32/16/8 with 32-channel heads), the square-root-linear
betas 0.0015 -> 0.0195 (diffusers' "scaled_linear"), lr 9.6e-5 at batch 48, DDIM sampling.
Needs the tfds data set celeb_a_hq/256 (`tfds build celeb_a_hq/256 --manual_dir=...`).

    # 1. the autoencoder (reconstruction + KL; LDM adds perceptual and adversarial terms)
    diffusion-jax --config=configs/celebahq256_latent.py:autoencoder --workdir=runs/celebahq_ae
    # 2. encode the training set once, then train latent diffusion on it
    diffusion-jax --config=configs/celebahq256_latent.py --workdir=runs/celebahq_ldm \\
        --config.autoencoder.weights=runs/celebahq_ae
    # FID of decoded samples against reference statistics of the data set
    diffusion-jax --config=configs/celebahq256_latent.py --workdir=runs/celebahq_ldm --mode=eval \\
        --config.eval.reference_stats=celebahq256.npz \\
        --config.eval.inception_weights=pt_inception.pth

`--mode=encode` logs the latents' standard deviation: set autoencoder.scaling_factor to its
inverse for a new autoencoder (LDM's rescaling to unit variance).

Args (comma-separated): `autoencoder` trains the first stage; `smoke` shrinks it to a few
steps on a CPU.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("autoencoder", "smoke"))
    c = base_config()
    d = c.data
    d.dataset, d.image_size, d.channels, d.num_classes = "celeb_a_hq/256", 256, 3, 0
    d.random_flip = True
    d.eval_split = "train"

    a = c.autoencoder
    a.weights = "runs/celebahq_ae"
    a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels = 128, (1, 2, 4), 2, 3
    a.kl_weight = 1e-6
    a.scaling_factor = 1.0

    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks = 224, (1, 2, 3, 4), 2
    m.attn_resolutions, m.head_channels = (32, 16, 8), 32
    m.dropout = 0.0
    m.downsample_padding, m.flip_sin_to_cos, m.freq_shift = 1, True, 0.0

    f = c.diffusion
    f.schedule, f.num_timesteps, f.beta_start, f.beta_end = "scaled_linear", 1000, 0.0015, 0.0195

    o = c.optim
    o.lr, o.warmup_steps, o.grad_clip, o.ema_decay = 9.6e-5, 0, 0.0, 0.9999

    t = c.training
    t.batch_size, t.num_steps = 48, 410_000
    t.ckpt_every, t.sample_every = 5_000, 10_000

    s = c.sampling
    s.sampler, s.num_steps, s.eta, s.clip_denoised, s.batch_size = "ddim", 200, 0.0, False, 64
    c.eval.metrics = ("fid",)
    c.eval.num_samples = 50_000

    if "autoencoder" in options:
        t.objective = "autoencoder"
        t.batch_size, t.num_steps = 16, 200_000
        o.lr, o.grad_clip = 4.5e-6 * 16, 1.0
        c.eval.metrics = ("reconstruction",)
        c.eval.num_samples = 1_000
    if "smoke" in options:
        smoke(c)
        a.ch, a.ch_mult, a.norm_groups = 8, (1, 2), 4
        m.attn_resolutions, m.head_channels = (4,), -1
        s.clip_denoised = False
    return c
