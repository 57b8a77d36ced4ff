"""DDPM on LSUN 256x256 (Ho et al. 2020): church_outdoor (1.2M steps, random flips) or
bedroom (2.4M steps); the 114M-parameter U-Net, no dropout, lr 2e-5, batch 64.

    diffusion-jax --config=configs/lsun256.py:church --workdir=gs://bucket/runs/church
    diffusion-jax --config=configs/lsun256.py:bedroom --workdir=gs://bucket/runs/bedroom

Args (comma-separated): `church` (default) or `bedroom`; `smoke` shrinks it to a few steps.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import ddpm_recipe, parse_arg, smoke


def get_config(arg: str = "church"):
    options = parse_arg(arg, allowed=("church", "bedroom", "smoke"))
    bedroom = "bedroom" in options
    c = ddpm_recipe(base_config(), image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
    c.data.dataset = "lsun/bedroom" if bedroom else "lsun/church_outdoor"
    c.data.num_classes = 0
    c.data.random_flip = not bedroom
    c.data.eval_split = "validation"
    c.optim.lr = 2e-5
    c.training.batch_size = 64
    c.training.num_steps = 2_400_000 if bedroom else 1_200_000
    c.training.ckpt_every = 5_000
    c.training.sample_every = 10_000
    c.sampling.batch_size = 64
    if "smoke" in options:
        smoke(c)
    return c
