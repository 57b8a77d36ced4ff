"""diffusion_jax: denoising diffusion models in JAX/Flax, from one CPU to a pod."""

__version__ = "0.1.0"
