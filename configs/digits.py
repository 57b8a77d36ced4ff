"""The embedded default: a small U-Net on scikit-learn's handwritten digits at 16x16, on a CPU.

    diffusion-jax --config=configs/digits.py --workdir=runs/digits
    diffusion-jax --config=configs/digits.py:cond --workdir=runs/digits_cond   # guided classes
    diffusion-jax --config=configs/digits.py:smoke --workdir=/tmp/smoke        # a few steps

Args (comma-separated): `cond` trains class-conditionally with label dropout and samples
each digit with classifier-free guidance; `smoke` shrinks everything to run in seconds.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import digits_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("cond", "smoke"))
    c = base_config()
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2, 2), 1, (8,)
    m.norm_groups = 8
    m.dropout = 0.1
    digits_recipe(c, options)
    if "smoke" in options:
        smoke(c)
    return c
