"""A small DiT on the embedded digits at 16x16, on a CPU: the transformer counterpart of
configs/digits.py (same data, schedule, sampler and evaluation; only the network differs).

    diffusion-jax --config=configs/digits_dit.py --workdir=runs/digits_dit
    diffusion-jax --config=configs/digits_dit.py:cond --workdir=runs/digits_dit_cond  # guided
    diffusion-jax --config=configs/digits_dit.py:smoke --workdir=/tmp/smoke_dit      # seconds

The network: 4x4 patches (16 tokens), 6 adaLN-Zero blocks of width 128 in 4 heads, MLP
ratio 4 (1.9M parameters), trained for 4,000 steps of batch 64: a step costs about a quarter
of the U-Net's, so it takes more of them in the same time. Measured on 2 CPU cores: the
whole command 9.3 minutes, digits_fd 11.4 (seed 0) and 13.7 (seed 1), 88% of the digits
read surely, where the U-Net default scores 9.9 and 97% in 11.5 minutes. Other shapes in
the same time did worse (benchmarks/README.md, "The digits DiT"): 2x2 patches, whose steps
cost as much as the U-Net's, reach 26-59; width 192 in 2,200 steps 16.7; 5,500 steps 16.8.

Args (comma-separated): `cond` samples with classifier-free guidance 2, `uncond` trains and
samples without labels (as configs/digits.py); `smoke` shrinks everything to run in seconds.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import digits_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("cond", "uncond", "smoke"))
    c = base_config()
    m = c.model
    m.arch = "dit"
    m.dit.update(patch_size=4, hidden_size=128, depth=6, num_heads=4, mlp_ratio=4.0)
    m.dropout = 0.0
    digits_recipe(c, options)
    # 16 tokens make a step about 4x cheaper than the U-Net's: more of them in the same time.
    t = c.training
    t.num_steps, t.log_every, t.ckpt_every, t.sample_every = 4000, 250, 1000, 2000
    if "smoke" in options:
        smoke(c)
    return c
