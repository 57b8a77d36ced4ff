"""Pure diffusion math: schedules, the forward process, losses, samplers, likelihood and the
power-function EMA profiles.

Modules: schedules.py (beta schedules), process.py (q(x_t|x_0), the posterior, eps/x0/v),
losses.py, likelihood.py (bits/dim), ema.py (power-function EMA profiles); the samplers:
sampler_settings.py (`SamplerSettings`: every sampler option, their rules, NFE),
timesteps.py (the grids: spacings, Karras sigmas, diffusers' conventions), ancestral.py
(DDPM and DDIM steps), multistep.py (DPM-Solver++, UniPC), karras.py (Euler, Heun) and
sampling_loop.py (`sample`: the jitted scan over the steps, guidance).

from diffusion_jax import diffusion as dm
sched = dm.make_schedule("cosine", num_timesteps=1000)
x0 = dm.sample(model_fn, sched, key, x_T=x_T, sampler="ddim", num_steps=50)
"""

from diffusion_jax.diffusion.ema import (
    gamma_to_sigma_rel,
    posthoc_weights,
    power_ema_beta,
    profile_inner_products,
    sigma_rel_to_gamma,
)
from diffusion_jax.diffusion.likelihood import bits_per_dim
from diffusion_jax.diffusion.losses import (
    diffusion_loss,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    sample_timesteps,
    snr_loss_weight,
    vlb_term_bpd,
)
from diffusion_jax.diffusion.process import (
    eps_from_v,
    eps_from_x0,
    p_mean_variance,
    q_mean_variance,
    q_posterior,
    q_sample,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from diffusion_jax.diffusion.sampler_settings import SAMPLERS, SamplerSettings, nfe
from diffusion_jax.diffusion.sampling_loop import sample
from diffusion_jax.diffusion.schedules import (
    SCHEDULES,
    Schedule,
    make_schedule,
    schedule_from_alphas_cumprod,
    schedule_from_betas,
)
from diffusion_jax.diffusion.timesteps import (
    conventions_for,
    default_spacing,
    respaced_timesteps,
    sampling_grid,
)

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "SamplerSettings",
    "Schedule",
    "bits_per_dim",
    "conventions_for",
    "default_spacing",
    "diffusion_loss",
    "discretized_gaussian_log_likelihood",
    "eps_from_v",
    "eps_from_x0",
    "gamma_to_sigma_rel",
    "make_schedule",
    "nfe",
    "normal_kl",
    "p_mean_variance",
    "posthoc_weights",
    "power_ema_beta",
    "prior_bpd",
    "profile_inner_products",
    "q_mean_variance",
    "q_posterior",
    "q_sample",
    "respaced_timesteps",
    "sample",
    "sample_timesteps",
    "sampling_grid",
    "schedule_from_alphas_cumprod",
    "schedule_from_betas",
    "sigma_rel_to_gamma",
    "snr_loss_weight",
    "v_from_x0_eps",
    "vlb_term_bpd",
    "x0_from_eps",
    "x0_from_v",
]
