"""Improved DDPM on CIFAR-10 (Nichol & Dhariwal 2021): cosine schedule over T=4000, learned
variances (learned_range) trained with the hybrid loss, 3 residual blocks per level,
attention at 16 and 8 with 4 heads, scale-shift norm, dropout 0.3, lr 1e-4, batch 128,
500k steps. Sampling with 100 respaced ancestral steps.

    diffusion-jax --config=configs/cifar10_improved.py --workdir=runs/cifar10_improved

Args: `smoke` shrinks it to a few steps on a CPU.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import improved_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("smoke",))
    c = improved_recipe(
        base_config(), image_size=32, ch_mult=(1, 2, 2, 2), attn_resolutions=(16, 8), dropout=0.3
    )
    c.data.dataset = "cifar10"
    c.data.num_classes = 10
    c.data.random_flip = True
    c.training.batch_size = 128
    c.training.num_steps = 500_000
    c.training.ckpt_every = 10_000
    c.training.sample_every = 20_000
    c.eval.metrics = ("fid", "is", "bpd")
    if "smoke" in options:
        smoke(c)
    return c
