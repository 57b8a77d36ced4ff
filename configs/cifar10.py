"""DDPM on CIFAR-10, exactly as Ho et al. (2020) trained it: the 35.7M-parameter U-Net, lr 2e-4
with 5,000 warm-up steps, batch 128, clipping at 1, EMA 0.9999, T=1000 linear betas, eps
prediction, fixed_large variance, random flips, 800k steps. FID 3.17 in the paper (50k
samples, 1,000 ancestral steps, against the training set).

    diffusion-jax --config=configs/cifar10.py --workdir=runs/cifar10
    diffusion-jax --config=configs/cifar10.py --workdir=runs/cifar10 --mode=eval \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth \
        --config.eval.reference_stats=cifar10_train_stats.npz

Args: `smoke` shrinks it to a few steps on a CPU.
"""

from diffusion_jax.config import base_config, ddpm_recipe, parse_arg, smoke


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("smoke",))
    c = ddpm_recipe(base_config(), image_size=32, ch_mult=(1, 2, 2, 2), dropout=0.1)
    c.data.dataset = "cifar10"
    c.data.num_classes = 10
    c.data.random_flip = True
    c.training.batch_size = 128
    c.training.num_steps = 800_000
    c.training.ckpt_every = 10_000
    c.training.sample_every = 20_000
    if "smoke" in options:
        smoke(c)
    return c
