"""Training losses: L_simple, the variational bound terms, the hybrid loss and SNR weightings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import process
from diffusion_jax.diffusion.schedules import Schedule

LOSS_TYPES = ("mse", "hybrid", "kl")
WEIGHTINGS = ("none", "snr", "min_snr", "truncated_snr")


def mean_flat(x):
    """Mean over every axis but the first: (B, ...) -> (B,)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    KL = 0.5 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2)
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Phi(x) by the tanh approximation used by the original DDPM code (max error ~1e-3)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data on 256 bins in [-1, 1] under N(means, e^(2 log_scales)) (Eq. 13, Ho et al.).

    Each bin is [x - 1/255, x + 1/255]; the edge bins extend to -inf and +inf, so the
    probabilities of the 256 bins sum to one. All arrays broadcast to x's shape; returns nats.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )


def prior_bpd(sched: Schedule, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (B, ...) -> (B,)."""
    t = jnp.full((x0.shape[0],), sched.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_variance = process.q_mean_variance(sched, x0, t)
    kl = normal_kl(mean, jnp.broadcast_to(log_variance, mean.shape), 0.0, 0.0)
    return mean_flat(kl) / math.log(2.0)


def vlb_term_bpd(sched: Schedule, x0, x_t, t, model_mean, model_log_variance):
    """One term of the bound in bits/dim, (B,): L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    for t > 0, and the decoder NLL L_0 = -log p(x_0 | x_1) on 256 bins for t = 0."""
    true_mean, _, true_log_variance = process.q_posterior(sched, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    )
    return jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)


def snr_loss_weight(sched: Schedule, t, prediction: str, weighting: str, gamma: float = 5.0):
    """Per-example weight (B,) making the MSE on the target equal w(t) ||x0 - x0_hat||^2.

    The MSE on eps equals snr * the MSE on x0, and the MSE on v equals (snr + 1) * the MSE on
    x0, so a weighting is defined by its x0-space weight w(t):
      none: the target's own weighting (returns 1);  snr: w = snr (eps-MSE);
      min_snr: w = min(snr, gamma) (Hang et al. 2023);  truncated_snr: w = max(snr, 1)
      (Salimans & Ho 2022).
    """
    if weighting == "none":
        return jnp.ones(t.shape, sched.snr.dtype)
    snr = sched.snr[t]
    x0_weight = {
        "snr": lambda: snr,
        "min_snr": lambda: jnp.minimum(snr, gamma),
        "truncated_snr": lambda: jnp.maximum(snr, 1.0),
    }
    if weighting not in x0_weight:
        raise ValueError(
            f"unknown diffusion.loss_weighting {weighting!r}; choose one of {WEIGHTINGS}"
        )
    target_factor = {"eps": snr, "x0": jnp.ones_like(snr), "v": snr + 1.0}[prediction]
    return x0_weight[weighting]() / target_factor


def diffusion_loss(
    sched: Schedule,
    model_output,
    x0,
    x_t,
    t,
    noise,
    *,
    prediction: str = "eps",
    variance: str = "fixed_large",
    loss_type: str = "mse",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
):
    """The per-example training loss (B,) and its terms.

    mse: L_simple = w(t) ||target - f_theta(x_t, t)||^2 averaged over dimensions (Eq. 14 of
      Ho et al. with w = 1); with a learned variance the variance output gets the VLB term.
    hybrid: L_simple + lambda L_vlb with lambda = 1/1000 rescaled to T (Nichol & Dhariwal):
      the VLB term sees the mean through a stop-gradient, so it trains only the variance.
    kl: the VLB term alone (in bits/dim, scaled by T).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown diffusion.loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    mean_output, var_output = process.split_variance_output(model_output, variance)
    target = process.target_from_x0_eps(sched, prediction, x0, noise, t)
    weight = snr_loss_weight(sched, t, prediction, weighting, min_snr_gamma)
    mse = mean_flat((target - mean_output) ** 2)
    terms = {"mse": mse}
    learned = var_output is not None
    if loss_type == "kl" or learned:
        frozen_mean = mean_output if loss_type == "kl" else jax.lax.stop_gradient(mean_output)
        frozen = (
            frozen_mean
            if var_output is None
            else jnp.concatenate([frozen_mean, var_output], axis=-1)
        )
        out = process.p_mean_variance(
            sched, frozen, x_t, t, prediction=prediction, variance=variance, clip_denoised=False
        )
        # Scaled by T so the bound's sum over t has the magnitude of one uniform sample's term
        # times T, as improved DDPM does; the hybrid loss then divides by 1000.
        vb = vlb_term_bpd(sched, x0, x_t, t, out["mean"], out["log_variance"])
        vb = vb * sched.num_timesteps
        terms["vb"] = vb
    if loss_type == "kl":
        loss = terms["vb"]
    else:
        loss = weight * mse
        if learned:
            loss = loss + terms["vb"] / 1000.0
    terms["loss"] = loss
    return loss, terms


def sample_timesteps(key, batch_size: int, num_timesteps: int):
    """t ~ Uniform{0, ..., T-1}, shape (batch_size,) int32."""
    return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
