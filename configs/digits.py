"""The embedded default: a small U-Net on scikit-learn's handwritten digits at 16x16, on a CPU.

    diffusion-jax --config=configs/digits.py --workdir=runs/digits
    diffusion-jax --config=configs/digits.py:cond --workdir=runs/digits_cond     # guidance 2
    diffusion-jax --config=configs/digits.py:uncond --workdir=runs/digits_uncond # no labels
    diffusion-jax --config=configs/digits.py:smoke --workdir=/tmp/smoke          # a few steps

A class-conditional U-Net (10% label dropout, min-SNR weighting) sampled one row per digit
with DPM-Solver++(2M) SDE in 50 evaluations (`recipes.digits_recipe` says why these).

Args (comma-separated): `cond` samples with classifier-free guidance 2 (surer, less varied
digits); `uncond` trains and samples without labels; `smoke` shrinks everything to run in
seconds.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import digits_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("cond", "uncond", "smoke"))
    c = base_config()
    m = c.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2, 2), 1, (8,)
    m.norm_groups = 8
    m.dropout = 0.0  # 1,200 steps are too few for dropout to pay
    digits_recipe(c, options)
    if "smoke" in options:
        smoke(c)
    return c
