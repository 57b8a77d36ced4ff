"""DDPM on CelebA-HQ 256x256 (Ho et al. 2020): the 114M-parameter U-Net (ch_mult
1,1,2,2,4,4, attention at 16x16), no dropout, lr 2e-5, batch 64, random flips, 0.5M steps.
Needs the tfds data set celeb_a_hq/256, which is prepared from manually downloaded files
(see the tfds catalog) with `tfds build celeb_a_hq/256 --manual_dir=...`.

    diffusion-jax --config=configs/celebahq256.py --workdir=gs://bucket/runs/celebahq256

Args: `smoke` shrinks it to a few steps on a CPU.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import ddpm_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("smoke",))
    c = ddpm_recipe(base_config(), image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
    c.data.dataset = "celeb_a_hq/256"
    c.data.num_classes = 0
    c.data.random_flip = True
    c.data.eval_split = "train"
    c.optim.lr = 2e-5
    c.training.batch_size = 64
    c.training.num_steps = 500_000
    c.training.ckpt_every = 5_000
    c.training.sample_every = 10_000
    c.sampling.batch_size = 64
    if "smoke" in options:
        smoke(c)
    return c
