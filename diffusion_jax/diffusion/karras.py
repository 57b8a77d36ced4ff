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

Two conventions of diffusers' EulerDiscreteScheduler are arguments here rather than
choices, so that a pipeline folder samples as diffusers does (`timesteps.Conventions`):
the Karras sigmas may span the spaced timesteps' sigmas instead of the schedule's, and a
sigma may become a fractional timestep t(sigma) (`timestep_of_sigma`) at which the network
is evaluated, with the solver on the exact sigma. The grid's levels then are not the
table's: each step carries its own abar = 1 / (1 + sigma^2).

A step function is `step(ctx, carry, i) -> (carry, x0)`; ctx is the sampler context of
`sampling_loop.py` (timesteps (K,), the level abar of each step, alpha and sigma (K + 1,) with
the final point appended, the schedule, the churn settings, `x0`, `x0_at` and `noise`).
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


def timestep_of_sigma(alphas_cumprod, sigma):
    """The fractional timestep whose sigma is `sigma`, linear in log sigma between the two
    timesteps around it (diffusers' `_sigma_to_t`): with l_t = log sigma_t increasing,
    t = n + (log sigma - l_n) / (l_{n+1} - l_n) for l_n <= log sigma < l_{n+1}, clipped to
    [0, T - 1]. sigma of any shape; float of that shape. Traceable."""
    table = log_sigmas(alphas_cumprod)
    log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
    low = jnp.clip(jnp.searchsorted(table, log_sigma, side="right") - 1, 0, table.shape[0] - 2)
    w = jnp.clip((table[low] - log_sigma) / (table[low] - table[low + 1]), 0.0, 1.0)
    return low + w


def sigma_at_timestep(alphas_cumprod, t):
    """sigma at a fractional timestep: linear in sigma between the two around it (diffusers'
    interpolation_type="linear"); exact at integers. Traceable."""
    table = jnp.exp(log_sigmas(alphas_cumprod))
    return jnp.interp(t, jnp.arange(table.shape[0], dtype=table.dtype), table)


def karras_timesteps(
    alphas_cumprod, num_steps: int, rho: float = RHO, sigma_min=None, sigma_max=None
):
    """The K distinct timesteps, descending, whose sigmas are nearest the Karras sigmas; (K,).

    sigma_min and sigma_max default to the sigmas of t = 0 and t = T - 1. Where the Karras
    grid is denser than the discrete one (near sigma_min once K is large), rounding would
    repeat a timestep and spend an evaluation on a step of length 0, so repeats are pushed
    apart: t_i = min(max_{j >= i} (n_j + j) - i, T - 1 - i) for the rounded n_i, which keeps
    n_i where it is already strictly decreasing and is strictly decreasing for K <= T.
    Traceable (the schedule may be a traced argument).
    """
    table = log_sigmas(alphas_cumprod)
    num_timesteps = alphas_cumprod.shape[0]
    sigma_min = jnp.exp(table[0]) if sigma_min is None else sigma_min
    sigma_max = jnp.exp(table[-1]) if sigma_max is None else sigma_max
    sigmas = karras_sigmas(sigma_min, sigma_max, num_steps, rho)
    nearest = nearest_timestep(table, sigmas)
    index = jnp.arange(num_steps, dtype=jnp.int32)
    distinct = jax.lax.cummax(nearest + index, reverse=True) - index
    return jnp.minimum(distinct, num_timesteps - 1 - index)


def init(ctx, x_T):
    """x_sigma at the first step: x_T / sqrt(abar_0) = x_T sqrt(1 + sigma_0^2), x_T being a
    sample at the first level; or x_T sigma_0 when `ctx.init_sigma_only` (diffusers'
    EulerDiscreteScheduler with "linspace" or "trailing" spacing scales the initial noise by
    init_noise_sigma = sigma_max alone)."""
    if ctx.init_sigma_only:
        return (x_T * (ctx.sigma[0] / ctx.alpha[0]),)
    return (x_T / ctx.alpha[0],)


def _denoise(ctx, x, i):
    """(x^, sigma^, D(x^; sigma^)): the churned point of step i (`_churn`) and the x0
    prediction there, the network seeing x_t = sqrt(abar) x^ at its level."""
    x_hat, t_hat, abar_hat = _churn(ctx, x, i)
    sigma_hat = jnp.sqrt((1.0 - abar_hat) / abar_hat)
    return x_hat, sigma_hat, ctx.x0_at(x_hat * jnp.sqrt(abar_hat), t_hat, abar_hat)


def _churn(ctx, x, i):
    """Lines 4-6 of EDM's Algorithm 2: raise sigma_i to sigma^ = sigma_i (1 + gamma_i).

    gamma_i = min(S_churn / K, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0, and
    x^ = x + sqrt(sigma^2 - sigma_i^2) S_noise z; sigma^ is rounded to a timestep like every
    sigma (EDM's code rounds it too), so a small gamma may leave sigma and x unchanged.
    Returns (x^, t^, abar^), the level abar^ = 1 / (1 + sigma^^2). The churn settings are
    static: S_churn = 0 traces no noise.
    """
    t, abar = ctx.timesteps[i], ctx.abar[i]
    if ctx.s_churn == 0:
        return x, t, abar
    sigma = ctx.sigma[i] / ctx.alpha[i]
    in_range = (ctx.s_tmin <= sigma) & (sigma <= ctx.s_tmax)
    gamma = jnp.where(in_range, min(ctx.s_churn / ctx.num_steps, 2.0**0.5 - 1.0), 0.0)
    table = log_sigmas(ctx.sched.alphas_cumprod)
    t_hat = nearest_timestep(table, sigma * (1.0 + gamma))
    # Rounded back to t itself (or below it), nothing is added and sigma keeps its value.
    raised = t_hat > t
    sigma_hat = jnp.where(raised, jnp.exp(table[t_hat]), sigma)
    spread = jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)) * ctx.s_noise
    abar_hat = jnp.where(raised, ctx.sched.alphas_cumprod[t_hat], abar)
    t_hat = jnp.where(raised, t_hat.astype(t.dtype), t)
    return x + spread * ctx.noise(i, x), t_hat, abar_hat


def euler_step(ctx, carry, i):
    """Euler step of the probability-flow ODE (EDM Algorithm 2 without its 2nd-order correction).

    x' = x^ + (sigma' - sigma^) (x^ - D) / sigma^ = D + (sigma' / sigma^) (x^ - D),
    written in the second form so the last step (sigma' = 0) returns D exactly; a final
    sigma' > 0 (final_sigmas_type "sigma_min") returns x_sigma' as diffusers does.
    """
    (x,) = carry
    x_hat, sigma_hat, d0 = _denoise(ctx, x, i)
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
    x_hat, sigma_hat, d0 = _denoise(ctx, x, i)
    sigma_next = ctx.sigma[i + 1] / ctx.alpha[i + 1]
    x_euler = d0 + (sigma_next / sigma_hat) * (x_hat - d0)

    def correct(_):
        d1 = ctx.x0(x_euler * ctx.alpha[i + 1], jnp.minimum(i + 1, ctx.num_steps - 1))
        slope = 0.5 * ((x_hat - d0) / sigma_hat + (x_euler - d1) / sigma_next)
        return x_hat + (sigma_next - sigma_hat) * slope, d1

    # A cond, not a where: the last step must not pay for a second network evaluation.
    x_next, d1 = jax.lax.cond(i < ctx.num_steps - 1, correct, lambda _: (x_euler, d0), None)
    return (x_next,), jnp.stack([d0, d1])
