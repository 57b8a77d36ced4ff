"""A small DiT on the embedded digits at 16x16, on a CPU: the transformer counterpart of
configs/digits.py (same data, schedule, sampler and evaluation; only the network differs).

    diffusion-jax --config=configs/digits_dit.py --workdir=runs/digits_dit
    diffusion-jax --config=configs/digits_dit.py:cond --workdir=runs/digits_dit_cond  # guided
    diffusion-jax --config=configs/digits_dit.py:smoke --workdir=/tmp/smoke_dit      # seconds

The network: 2x2 patches (64 tokens), 6 adaLN-Zero blocks of width 96 in 4 heads, MLP ratio
4 (1.1M parameters). Its training time on 2 CPU cores and its digits_fd are to be measured;
the step count is sized for about the U-Net default's 8-12 minutes.

Args (comma-separated): `cond` trains class-conditionally (labels through adaLN, dropped 10%
of the time) and samples each digit with classifier-free guidance; `smoke` shrinks
everything to run in seconds.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import digits_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("cond", "uncond", "smoke"))
    c = base_config()
    m = c.model
    m.arch = "dit"
    m.dit.update(patch_size=2, hidden_size=96, depth=6, num_heads=4, mlp_ratio=4.0)
    m.dropout = 0.0
    digits_recipe(c, options)
    if "smoke" in options:
        smoke(c)
    return c
