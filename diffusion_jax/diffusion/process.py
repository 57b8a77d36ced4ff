"""The forward process, its posterior, and the reverse-process parameterizations.

Shapes: images x are (B, H, W, C) (any trailing shape works); timesteps t are (B,) int32
indices into the schedule.
"""

from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range", "learned")


def extract(coef: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
    """coef[t] reshaped to (B, 1, ..., 1) so it broadcasts against x of shape x_shape."""
    out = coef[t]
    return out.reshape(out.shape + (1,) * (len(x_shape) - out.ndim))


def q_sample(sched: Schedule, x0, t, noise):
    """Samples q(x_t | x_0) in closed form (Eq. 4 of Ho et al.).

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I); x0, noise (B, ...), t (B,).
    """
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_mean_variance(sched: Schedule, x0, t):
    """Mean, variance and log-variance of q(x_t | x_0); each broadcastable to x0 (B, ...)."""
    mean = extract(sched.sqrt_alphas_cumprod, t, x0.shape) * x0
    variance = extract(1.0 - sched.alphas_cumprod, t, x0.shape)
    log_variance = extract(sched.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, variance, log_variance


def q_posterior(sched: Schedule, x0, x_t, t):
    """The forward posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I) (Eqs. 6-7 of Ho et al.).

    mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
            + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t

    Returns (mean (B, ...), variance (B, 1, ...), log_variance clipped at t=0 (B, 1, ...)).
    """
    mean = (
        extract(sched.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(sched.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(sched.posterior_variance, t, x_t.shape)
    log_variance = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def x0_from_eps(sched: Schedule, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (
        extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def eps_from_x0(sched: Schedule, x_t, t, x0):
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    return (extract(sched.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        sched.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def v_from_x0_eps(sched: Schedule, x0, eps, t):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x0.shape) * eps
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
    )


def x0_from_v(sched: Schedule, x_t, t, v):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (
        extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


def eps_from_v(sched: Schedule, x_t, t, v):
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    return (
        extract(sched.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        + extract(sched.sqrt_alphas_cumprod, t, x_t.shape) * v
    )


def x0_eps_from_prediction(sched: Schedule, prediction: str, model_mean_output, x_t, t):
    """Turns a network output under `prediction` into (x0, eps), each (B, ...)."""
    if prediction == "eps":
        eps = model_mean_output
        return x0_from_eps(sched, x_t, t, eps), eps
    if prediction == "x0":
        x0 = model_mean_output
        return x0, eps_from_x0(sched, x_t, t, x0)
    if prediction == "v":
        return x0_from_v(sched, x_t, t, model_mean_output), eps_from_v(
            sched, x_t, t, model_mean_output
        )
    raise ValueError(f"unknown diffusion.prediction {prediction!r}; choose one of {PREDICTIONS}")


def x0_eps_at_level(prediction: str, model_mean_output, x_t, alpha_bar):
    """(x0, eps) of a network output at the noise level abar = `alpha_bar` (a scalar, which
    need not be a timestep's: samplers visit levels between them), with a = sqrt(abar),
    b = sqrt(1 - abar) and x_t = a x0 + b eps:
        eps: x0 = (x_t - b eps) / a;   x0: eps = (x_t - a x0) / b;
        v:   x0 = a x_t - b v,  eps = b x_t + a v."""
    a, b = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if prediction == "eps":
        return (x_t - b * model_mean_output) / a, model_mean_output
    if prediction == "x0":
        return model_mean_output, (x_t - a * model_mean_output) / b
    if prediction == "v":
        return a * x_t - b * model_mean_output, b * x_t + a * model_mean_output
    raise ValueError(f"unknown diffusion.prediction {prediction!r}; choose one of {PREDICTIONS}")


def target_from_x0_eps(sched: Schedule, prediction: str, x0, eps, t):
    """The regression target of the network under `prediction`: eps, x0 or v."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(sched, x0, eps, t)
    raise ValueError(f"unknown diffusion.prediction {prediction!r}; choose one of {PREDICTIONS}")


def split_variance_output(model_output, variance: str):
    """Splits (B, ..., C) or (B, ..., 2C) into the mean part and the variance part (or None)."""
    if variance in ("learned_range", "learned"):
        channels = model_output.shape[-1] // 2
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def p_variance(sched: Schedule, variance: str, var_output, x_t, t):
    """Variance and log-variance of p(x_{t-1} | x_t), each broadcastable to x_t.

    fixed_small: beta~_t; fixed_large: beta_t (with beta~_1 at t=0, as improved DDPM);
    learned_range: exp(v log beta_t + (1 - v) log beta~_t) with v = (out + 1)/2 (Eq. 15 of
    Nichol & Dhariwal); learned: exp(out).
    """
    if variance == "fixed_small":
        return (
            extract(sched.posterior_variance, t, x_t.shape),
            extract(sched.posterior_log_variance_clipped, t, x_t.shape),
        )
    if variance == "fixed_large":
        large = jnp.concatenate([sched.posterior_variance[1:2], sched.betas[1:]])
        if sched.num_timesteps == 1:
            large = sched.betas
        return extract(large, t, x_t.shape), extract(jnp.log(large), t, x_t.shape)
    if variance == "learned_range":
        min_log = extract(sched.posterior_log_variance_clipped, t, x_t.shape)
        max_log = extract(jnp.log(sched.betas), t, x_t.shape)
        frac = (var_output + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if variance == "learned":
        return jnp.exp(var_output), var_output
    raise ValueError(f"unknown diffusion.variance {variance!r}; choose one of {VARIANCES}")


def p_mean_variance(
    sched: Schedule,
    model_output,
    x_t,
    t,
    *,
    prediction: str = "eps",
    variance: str = "fixed_large",
    clip_denoised: bool = True,
):
    """The reverse step p(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) for a network output.

    mu_theta is the posterior mean mu~_t(x0_hat, x_t) at the predicted x0_hat (clipped to
    [-1, 1] when `clip_denoised`), which for eps prediction equals Eq. 11 of Ho et al.

    Args:
      model_output: (B, ..., C), or (B, ..., 2C) for the learned variances.
      x_t: (B, ..., C); t: (B,) int.

    Returns:
      dict with "mean", "variance", "log_variance", "pred_x0", "pred_eps".
    """
    mean_output, var_output = split_variance_output(model_output, variance)
    model_variance, model_log_variance = p_variance(sched, variance, var_output, x_t, t)
    pred_x0, pred_eps = x0_eps_from_prediction(sched, prediction, mean_output, x_t, t)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = eps_from_x0(sched, x_t, t, pred_x0)
    mean, _, _ = q_posterior(sched, pred_x0, x_t, t)
    return {
        "mean": mean,
        "variance": jnp.broadcast_to(model_variance, x_t.shape),
        "log_variance": jnp.broadcast_to(model_log_variance, x_t.shape),
        "pred_x0": pred_x0,
        "pred_eps": pred_eps,
    }
