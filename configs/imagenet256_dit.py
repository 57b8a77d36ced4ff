"""DiT-XL/2 on ImageNet 256x256 (Peebles & Xie 2023): class-conditional latent diffusion on
the Stable Diffusion VAE's 32x32x4 latents (scaled by 0.18215), 28 adaLN-Zero blocks of
width 1152 in 16 heads over 2x2 patches (675M parameters), learned sigma with the hybrid
loss, linear betas over T=1000, labels dropped 10% of the time; AdamW at a constant 1e-4
without warm-up, weight decay or clipping, batch 256, EMA 0.9999. Sampling: 250 ancestral
steps with classifier-free guidance 1.5 (the paper's FID-50K 2.27 after 7M steps; 400K
steps is its ablation length, set here). Needs the tfds data set imagenet2012 (manual
download) and the VAE (`stabilityai/sd-vae-ft-ema`, a diffusers AutoencoderKL folder).

    # encode the training split once (256x256 centre crops), then train
    diffusion-jax --config=configs/imagenet256_dit.py --workdir=gs://bucket/runs/dit_xl2 \\
        --mode=encode --config.autoencoder.weights=sd-vae-ft-ema
    diffusion-jax --config=configs/imagenet256_dit.py --workdir=gs://bucket/runs/dit_xl2 \\
        --config.autoencoder.weights=sd-vae-ft-ema
    # FID/IS/precision/recall of 50K guided samples against ADM's reference batch statistics
    diffusion-jax --config=configs/imagenet256_dit.py --workdir=gs://bucket/runs/dit_xl2 \\
        --mode=eval --config.autoencoder.weights=sd-vae-ft-ema \\
        --config.eval.reference_stats=VIRTUAL_imagenet256_labeled.npz \\
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

The released weights (facebook/DiT-XL-2-256, or DiT-XL-2-256x256.pt of the original
repository) convert with `python -m diffusion_jax.tools.convert` into a file that
--mode=sample|eval read through eval.params_file.

Differences from the original: activations are bfloat16 (parameters and optimizer float32;
the paper trained in float32: `--config.model.dtype=float32`); latents are encoded once,
without the original's random flips (a flipped latent is not the latent of the flipped
image); guidance applies to every latent channel (the original's sampler guides the first
three of four).

Args (comma-separated): `smoke` shrinks it to a few steps on a CPU (a small VAE of the
same shape, e.g. one trained with configs/celebahq256_latent.py:autoencoder,smoke).
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import dit_model, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("smoke",))
    c = base_config()
    d = c.data
    d.dataset, d.image_size, d.channels, d.num_classes = "imagenet2012", 256, 3, 1000
    d.eval_split = "validation"

    a = c.autoencoder
    a.weights = "sd-vae-ft-ema"
    a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels = 128, (1, 2, 4, 4), 2, 4
    a.norm_groups, a.scaling_factor = 32, 0.18215

    m = c.model
    dit_model(c, "XL/2")
    m.learn_sigma, m.class_conditional = True, True
    m.dropout = 0.0
    m.dtype = "bfloat16"

    f = c.diffusion
    f.schedule, f.num_timesteps, f.prediction = "linear", 1000, "eps"
    f.variance, f.loss_type = "learned_range", "hybrid"

    o = c.optim
    o.optimizer, o.lr, o.weight_decay, o.warmup_steps = "adamw", 1e-4, 0.0, 0
    o.decay, o.grad_clip, o.ema_decay = "constant", 0.0, 0.9999

    t = c.training
    t.batch_size, t.num_steps, t.cond_drop_prob = 256, 400_000, 0.1
    t.ckpt_every, t.sample_every, t.log_every = 50_000, 50_000, 100

    s = c.sampling
    s.sampler, s.num_steps, s.guidance_scale, s.clip_denoised = "ddpm", 250, 1.5, False
    s.batch_size = 256
    c.eval.metrics = ("fid", "is", "precision", "recall")
    c.eval.num_samples = 50_000

    if "smoke" in options:
        smoke(c)
        a.ch, a.ch_mult, a.norm_groups = 8, (1, 2), 4
        m.dtype = "float32"
    return c
