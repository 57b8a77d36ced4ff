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
from diffusion_jax.recipes import parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("cond", "smoke"))
    c = base_config()
    c.data.dataset = "digits"
    c.data.image_size = 16
    c.data.channels = 1
    c.data.num_classes = 10

    m = c.model
    m.arch = "dit"
    m.dit.update(patch_size=2, hidden_size=96, depth=6, num_heads=4, mlp_ratio=4.0)
    m.dropout = 0.0

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.decay = "cosine"
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True

    t = c.training
    t.batch_size = 64
    t.num_steps = 1200
    t.log_every = 100
    t.ckpt_every = 400
    t.sample_every = 400
    t.eval_at_end = True

    c.sampling.sampler = "ddim"
    c.sampling.num_steps = 50
    c.sampling.num_samples = 100

    c.eval.num_samples = 500
    c.eval.metrics = ("digits_fd",)

    if "cond" in options:
        m.class_conditional = True
        t.cond_drop_prob = 0.1
        c.sampling.guidance_scale = 2.0
    if "smoke" in options:
        smoke(c)
    return c
