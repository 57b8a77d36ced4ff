"""Improved DDPM on ImageNet 64x64 (Nichol & Dhariwal 2021): cosine schedule over T=4000,
learned variances with the hybrid loss, ch=128 with ch_mult 1,2,3,4, 3 residual blocks,
attention at 32, 16 and 8 with 4 heads, scale-shift norm, lr 1e-4, batch 128,
class-unconditional. Data: tfds imagenet_resized/64x64 (box-resized ImageNet).

    diffusion-jax --config=configs/imagenet64.py --workdir=gs://bucket/runs/imagenet64

Args (comma-separated): `cond` adds class conditioning with classifier-free guidance;
`smoke` shrinks it to a few steps on a CPU.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import improved_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("cond", "smoke"))
    c = improved_recipe(
        base_config(),
        image_size=64,
        ch_mult=(1, 2, 3, 4),
        attn_resolutions=(32, 16, 8),
        dropout=0.0,
    )
    c.data.dataset = "imagenet_resized/64x64"
    c.data.num_classes = 1000
    c.data.random_flip = False
    c.data.eval_split = "validation"
    c.training.batch_size = 128
    c.training.num_steps = 1_500_000
    c.training.ckpt_every = 10_000
    c.training.sample_every = 20_000
    c.eval.metrics = ("fid", "is", "precision", "recall")
    if "cond" in options:
        c.model.class_conditional = True
        c.training.cond_drop_prob = 0.1
        c.sampling.guidance_scale = 1.5
    if "smoke" in options:
        smoke(c)
    return c
