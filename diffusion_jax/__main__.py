"""`python -m diffusion_jax` is `diffusion-jax`."""

from diffusion_jax.main import run

run()
