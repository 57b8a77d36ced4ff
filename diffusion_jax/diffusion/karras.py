"""Euler and Heun steps of EDM (Karras et al. 2022) over Karras sigmas, for VP models.

A VP model sees x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Dividing by sqrt(abar_t) gives
the variance-exploding variable x_sigma = x_0 + sigma eps with sigma_t = sqrt((1 - abar_t) /
abar_t), in which the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma and the
denoiser D is the model's x0 prediction at x_t = x_sigma / sqrt(1 + sigma^2). The steps below
integrate that ODE from sigma_max = sigma_{T-1} to sigma = 0; their carry is x_sigma.

The network only knows the T discrete timesteps, so every sigma the solver visits is rounded
to the nearest sigma_t in log sigma (EDM's `round_sigma` of its iDDPM preconditioner, in log
rather than linear distance) and the ODE is integrated on those rounded sigmas: D is then
evaluated exactly where the network was trained. diffusers' EulerDiscreteScheduler instead
interpolates a fractional timestep in log sigma, which needs a network that accepts
non-integer t; our model_fn takes int32 timesteps.

A step function is `step(ctx, carry, i) -> (carry, x0)`; ctx is the sampler context of
`samplers.py` (timesteps (K,), alpha and sigma (K + 1,) with the data point (1, 0) appended,
the schedule, the churn settings, `x0_at` and `noise`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

RHO = 7.0


def log_sigmas(alphas_cumprod):
    """log sigma_t = 0.5 log((1 - abar_t) / abar_t) of every timestep, increasing; (T,)."""
    return 0.5 * (jnp.log1p(-alphas_cumprod) - jnp.log(alphas_cumprod))


def karras_sigmas(sigma_min, sigma_max, num_steps: int, rho: float = RHO):
    """Eq. 5 of Karras et al.: K noise levels from sigma_max down to sigma_min, (K,).

    sigma_i = (sigma_max^(1/rho) + i / (K - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    """
    ramp = jnp.linspace(0.0, 1.0, num_steps) if num_steps > 1 else jnp.zeros((1,))
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def nearest_timestep(log_sigma_table, sigma):
    """argmin_t |log sigma_t - log sigma| for sigma of any shape; int32 of that shape."""
    distance = jnp.abs(log_sigma_table - jnp.log(sigma)[..., None])
    return jnp.argmin(distance, axis=-1).astype(jnp.int32)


def karras_timesteps(alphas_cumprod, num_steps: int, rho: float = RHO):
    """The K distinct timesteps, descending, whose sigmas are nearest the Karras sigmas; (K,).

    sigma_min and sigma_max are the sigmas of t = 0 and t = T - 1. Where the Karras grid is
    denser than the discrete one (near sigma_min once K is large), rounding would repeat a
    timestep and spend an evaluation on a step of length 0, so repeats are pushed apart:
    t_i = min(max_{j >= i} (n_j + j) - i, T - 1 - i) for the rounded n_i, which keeps n_i
    where it is already strictly decreasing and is strictly decreasing for K <= T.
    Traceable (the schedule may be a traced argument).
    """
    table = log_sigmas(alphas_cumprod)
    num_timesteps = alphas_cumprod.shape[0]
    sigmas = karras_sigmas(jnp.exp(table[0]), jnp.exp(table[-1]), num_steps, rho)
    nearest = nearest_timestep(table, sigmas)
    index = jnp.arange(num_steps, dtype=jnp.int32)
    distinct = jax.lax.cummax(nearest + index, reverse=True) - index
    return jnp.minimum(distinct, num_timesteps - 1 - index)


def init(ctx, x_T):
    """x_sigma at the first timestep: x_T / sqrt(abar_{t_0}) (diffusers' init_noise_sigma)."""
    return (x_T / ctx.alpha[0],)


def _denoise(ctx, x, t):
    """D(x_sigma; sigma_t) = the x0 prediction at x_t = sqrt(abar_t) x_sigma."""
    return ctx.x0_at(x * jnp.sqrt(ctx.sched.alphas_cumprod[t]), t)


def _churn(ctx, x, i):
    """Lines 4-6 of EDM's Algorithm 2: raise sigma_i to sigma^ = sigma_i (1 + gamma_i).

    gamma_i = min(S_churn / K, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0, and
    x^ = x + sqrt(sigma^2 - sigma_i^2) S_noise z; sigma^ is rounded to a timestep like every
    sigma (EDM's code rounds it too), so a small gamma may leave sigma and x unchanged.
    Returns (x^, t^, sigma^). The churn settings are static: S_churn = 0 traces no noise.
    """
    t, sigma = ctx.timesteps[i], ctx.sigma[i] / ctx.alpha[i]
    if ctx.s_churn == 0:
        return x, t, sigma
    in_range = (ctx.s_tmin <= sigma) & (sigma <= ctx.s_tmax)
    gamma = jnp.where(in_range, min(ctx.s_churn / ctx.num_steps, 2.0**0.5 - 1.0), 0.0)
    table = log_sigmas(ctx.sched.alphas_cumprod)
    t_hat = nearest_timestep(table, sigma * (1.0 + gamma))
    # Rounded back to t itself, nothing is added (and sigma keeps its exact value).
    raised = t_hat > t
    sigma_hat = jnp.where(raised, jnp.exp(table[t_hat]), sigma)
    spread = jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)) * ctx.s_noise
    return x + spread * ctx.noise(i, x), jnp.where(raised, t_hat, t), sigma_hat


def euler_step(ctx, carry, i):
    """Euler step of the probability-flow ODE (EDM Algorithm 2 without its 2nd-order correction).

    x' = x^ + (sigma' - sigma^) (x^ - D) / sigma^ = D + (sigma' / sigma^) (x^ - D),
    written in the second form so the last step (sigma' = 0) returns D exactly.
    """
    (x,) = carry
    x_hat, t_hat, sigma_hat = _churn(ctx, x, i)
    d0 = _denoise(ctx, x_hat, t_hat)
    sigma_next = ctx.sigma[i + 1] / ctx.alpha[i + 1]
    x_next = d0 + (sigma_next / sigma_hat) * (x_hat - d0)
    return (x_next,), d0


def heun_step(ctx, carry, i):
    """EDM Algorithm 2 (Algorithm 1 when S_churn = 0): Euler, then the trapezoidal correction.

    x_E = x^ + (sigma' - sigma^) d,  d = (x^ - D(x^; sigma^)) / sigma^,
    x' = x^ + (sigma' - sigma^) (d + d') / 2,  d' = (x_E - D(x_E; sigma')) / sigma',
    except on the last step (sigma' = 0), which stays the Euler step and costs one
    evaluation. Returns the x0 predictions of both evaluations (2, B, ...); the second of the
    last step repeats the first and is dropped by the caller.
    """
    (x,) = carry
    x_hat, t_hat, sigma_hat = _churn(ctx, x, i)
    d0 = _denoise(ctx, x_hat, t_hat)
    sigma_next = ctx.sigma[i + 1] / ctx.alpha[i + 1]
    x_euler = d0 + (sigma_next / sigma_hat) * (x_hat - d0)

    def correct(_):
        t_next = ctx.timesteps[jnp.minimum(i + 1, ctx.num_steps - 1)]
        d1 = _denoise(ctx, x_euler, t_next)
        slope = 0.5 * ((x_hat - d0) / sigma_hat + (x_euler - d1) / sigma_next)
        return x_hat + (sigma_next - sigma_hat) * slope, d1

    # A cond, not a where: the last step must not pay for a second network evaluation.
    x_next, d1 = jax.lax.cond(i < ctx.num_steps - 1, correct, lambda _: (x_euler, d0), None)
    return (x_next,), jnp.stack([d0, d1])
