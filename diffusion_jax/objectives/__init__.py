"""What a run trains, chosen once: `for_config(config, sched)` picks the functions of
`config.training.objective` and binds the settings they need.

- "diffusion": the denoising network of `config.model` learns the reverse process (the
  loss of `diffusion.prediction`, `diffusion.variance` and `diffusion.loss_type`); its
  picture is a grid of samples and it is scored on samples (FID, digits_fd, bits/dim).
- "autoencoder": the KL autoencoder of `config.autoencoder` learns to reconstruct images
  through its latents; its picture shows held-out images over their reconstructions and it
  is scored on held-out reconstruction errors.

Everything else (the step, the loop, evaluation) receives an `Objective` and calls its
functions; none of it asks which objective it has.

`picture` and `scores` are handed the run they belong to (`run.RunSetup`) by their caller,
the way big_vision's trainer hands its evaluators a predict function: from it they take the
config, the mesh and the functions compiled above this layer (the run's sampler, its
reconstruction). This package imports nothing above its layer.

    base.py         the `Objective` every objective is, the shared image batch spec
    diffusion.py    the diffusion objective: inputs, loss, sample grid, sample scores
    autoencoder.py  the autoencoder objective: inputs, loss, reconstructions, their errors
"""

from __future__ import annotations

from diffusion_jax.objectives.autoencoder import autoencoder, reconstruct
from diffusion_jax.objectives.base import Objective
from diffusion_jax.objectives.diffusion import diffusion, draw_step_inputs

OBJECTIVES = {"diffusion": diffusion, "autoencoder": autoencoder}


def for_config(config, sched) -> Objective:
    """The objective of config.training.objective, its settings bound (module doc)."""
    return OBJECTIVES[config.training.objective](config, sched)


__all__ = [
    "OBJECTIVES",
    "Objective",
    "autoencoder",
    "diffusion",
    "draw_step_inputs",
    "for_config",
    "reconstruct",
]
