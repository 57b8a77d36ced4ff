"""The embedded default: a small U-Net on scikit-learn's handwritten digits at 16x16, on a CPU.

    diffusion-jax --config=configs/digits.py --workdir=runs/digits
    diffusion-jax --config=configs/digits.py:cond --workdir=runs/digits_cond   # guided classes
    diffusion-jax --config=configs/digits.py:smoke --workdir=/tmp/smoke        # a few steps

Args (comma-separated): `cond` trains class-conditionally with label dropout and samples
each digit with classifier-free guidance; `smoke` shrinks everything to run in seconds.
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
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2, 2), 1, (8,)
    m.norm_groups = 8
    m.dropout = 0.1

    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000

    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.decay = "cosine"
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = True

    t = c.training
    t.batch_size = 64
    # 1.7-2.7 steps/s on 2 CPU cores (machines differ): 8-12 minutes, then ~1 minute of
    # evaluation.
    t.num_steps = 1200
    t.log_every = 100
    t.ckpt_every = 400
    t.sample_every = 400
    t.eval_at_end = True

    c.sampling.sampler = "ddim"
    c.sampling.num_steps = 50
    c.sampling.num_samples = 100

    c.eval.num_samples = 500
    # bpd is available (--config.eval.metrics='("digits_fd","bpd")'), at 1,000 network
    # evaluations per batch.
    c.eval.metrics = ("digits_fd",)

    if "cond" in options:
        m.class_conditional = True
        t.cond_drop_prob = 0.1
        c.sampling.guidance_scale = 2.0
    if "smoke" in options:
        smoke(c)
    return c
