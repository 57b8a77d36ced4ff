"""Class-conditional DDPM on CIFAR-10 with classifier-free guidance (Ho & Salimans 2022):
the DDPM recipe plus a label embedding, labels dropped to the null label 10% of the time
in training, and guided sampling out = uncond + w (cond - uncond) with w = 1.3 (DDIM, 50
steps) by default.

    diffusion-jax --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond
    diffusion-jax --config=configs/cifar10_cond.py --workdir=runs/cifar10_cond --mode=sample \
        --config.sampling.guidance_scale=3.0

Args: `smoke` shrinks it to a few steps on a CPU.
"""

from diffusion_jax.config import base_config, ddpm_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("smoke",))
    c = ddpm_recipe(base_config(), image_size=32, ch_mult=(1, 2, 2, 2), dropout=0.1)
    c.data.dataset = "cifar10"
    c.data.num_classes = 10
    c.data.random_flip = True
    c.model.class_conditional = True
    c.training.cond_drop_prob = 0.1
    c.training.batch_size = 128
    c.training.num_steps = 800_000
    c.training.ckpt_every = 10_000
    c.training.sample_every = 20_000
    c.sampling.sampler, c.sampling.num_steps, c.sampling.guidance_scale = "ddim", 50, 1.3
    c.sampling.num_samples = 100  # ten per class in the grid
    if "smoke" in options:
        smoke(c)
    return c
