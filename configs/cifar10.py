"""DDPM on CIFAR-10, exactly as Ho et al. (2020) trained it: the 35.7M-parameter U-Net, lr 2e-4
with 5,000 warm-up steps, batch 128, clipping at 1, EMA 0.9999, T=1000 linear betas, eps
prediction, fixed_large variance, random flips, 800k steps. FID 3.17 in the paper (50k
samples, 1,000 ancestral steps, against the training set).

    diffusion-jax --config=configs/cifar10.py --workdir=runs/cifar10
    diffusion-jax --config=configs/cifar10.py --workdir=runs/cifar10 --mode=eval \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
        --config.eval.reference_stats=cifar10_train_stats.npz
    diffusion-jax --config=configs/cifar10.py:cond --workdir=runs/cifar10_cond
    diffusion-jax --config=configs/cifar10.py:cond --workdir=runs/cifar10_cond --mode=sample \
        --config.sampling.guidance_scale=3.0

Args (comma-separated): `cond` is class-conditional DDPM with classifier-free guidance (Ho &
Salimans 2022): the same recipe plus a label embedding, labels dropped to the null label 10%
of the time in training, and guided sampling out = uncond + w (cond - uncond) with w = 1.3
(DDIM, 50 steps) by default; `smoke` shrinks it to a few steps on a CPU.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import ddpm_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("cond", "smoke"))
    c = ddpm_recipe(base_config(), image_size=32, ch_mult=(1, 2, 2, 2), dropout=0.1)
    c.data.dataset = "cifar10"
    c.data.num_classes = 10
    c.data.random_flip = True
    c.training.batch_size = 128
    c.training.num_steps = 800_000
    c.training.ckpt_every = 10_000
    c.training.sample_every = 20_000
    if "cond" in options:
        c.model.class_conditional = True
        c.training.cond_drop_prob = 0.1
        c.sampling.sampler, c.sampling.num_steps, c.sampling.guidance_scale = "ddim", 50, 1.3
        c.sampling.num_samples = 100  # ten per class in the grid
    if "smoke" in options:
        smoke(c)
    return c
