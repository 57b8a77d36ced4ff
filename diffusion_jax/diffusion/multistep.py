"""Multistep solvers in log-SNR time: DPM-Solver++ (2M, 2M SDE, 3M) and UniPC, data prediction.

Notation: at step i of K the sample x sits at timestep t_i with alpha_i = sqrt(abar_{t_i}),
sigma_i = sqrt(1 - abar_{t_i}) and lambda_i = log(alpha_i / sigma_i); after the last step comes
the data point (alpha, sigma, lambda) = (1, 0, inf). h = lambda_{i+1} - lambda_i > 0 is the
step, m_i the (guided, clipped) x0 prediction at step i. The exact solution of the
probability-flow ODE in these variables (Lu et al. 2022, DPM-Solver++ Eq. 9) is
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + sigma_{i+1} int_{lambda_i}^{lambda_{i+1}} e^l x0(l) dl,
and the solvers differ in how they extrapolate x0(l) from the stored m's. Every solver warms
up with lower orders over its first steps. After the last step comes the final point: the
data (alpha, sigma) = (1, 0) by default, where the last step (h = inf) returns m_{K-1}: the
integral then weights only x0 at lambda = inf, and the best estimate of it is the newest.
With a final abar < 1 (diffusers' final_sigmas_type="sigma_min": the level of t = 0) the
last step is an ordinary finite step to it.

A step function is `step(ctx, carry, i) -> (carry, m_i)` with carry[0] the sample; ctx is the
sampler context of `sampling_loop.py` (alpha, sigma, lam (K + 1,), num_steps, final_is_data,
solver_order, lower_order_final, `x0`, `noise`).
"""

from __future__ import annotations

import jax.numpy as jnp

UNIPC_VARIANTS = ("bh1", "bh2")


# diffusers lowers the order of the last steps only below this many steps.
LOWER_ORDER_FINAL_BELOW = 15


def _steps(ctx, i):
    """(h, h_1, h_2): lambda_{i+1} - lambda_i and the two steps before it (0 where none).

    h is 1 on a last step into the data (its true value is inf), so that no coefficient
    computed for the unused finite update turns into nan.
    """
    lam = ctx.lam
    last = (i == ctx.num_steps - 1) & ctx.final_is_data
    h = jnp.where(last, 1.0, lam[i + 1] - lam[i])
    h_1 = lam[i] - lam[jnp.maximum(i - 1, 0)]
    h_2 = lam[jnp.maximum(i - 1, 0)] - lam[jnp.maximum(i - 2, 0)]
    return h, h_1, h_2


def _ratio(num, den, valid):
    """num / den where valid, else 1 (a placeholder that keeps unused branches finite)."""
    return jnp.where(valid, num / jnp.where(valid, den, 1.0), 1.0)


def step_order(ctx, i):
    """The order of step i (traced int): min(solver_order, i + 1), as step i has i earlier
    predictions (the warm-up); 1 on a last step into the data (h = inf). With
    `lower_order_final` and K < 15 steps also 1 on the last step and at most 2 on the one
    before (diffusers' lower_order_final, for stability with few steps)."""
    k = ctx.num_steps
    order = jnp.minimum(ctx.solver_order, i + 1)
    lower = ctx.lower_order_final and k < LOWER_ORDER_FINAL_BELOW
    if ctx.final_is_data or lower:
        order = jnp.where(i == k - 1, 1, order)
    if lower:
        order = jnp.where(i == k - 2, jnp.minimum(order, 2), order)
    return order


def _finish(ctx, i, x_next, m):
    """The step's output: x_{i+1}, or m_i after a last step into the data."""
    if not ctx.final_is_data:
        return x_next
    return jnp.where(i < ctx.num_steps - 1, x_next, m)


def _midpoint_data(ctx, carry, i):
    """(x, m_i, h, D) of a 2M step: the data prediction m_i = x0(x, t_i), the step
    h = lambda_{i+1} - lambda_i and D = m_i + 1/(2r) (m_i - m_{i-1}), r = h_{i-1} / h
    (first order, D = m_i, where `step_order` is 1)."""
    x, m_prev = carry
    m = ctx.x0(x, i)
    h, h_1, _ = _steps(ctx, i)
    second_order = step_order(ctx, i) >= 2
    r = _ratio(h_1, h, second_order)
    return x, m, h, jnp.where(second_order, m + (0.5 / r) * (m - m_prev), m)


def dpm_solver_pp_2m_step(ctx, carry, i):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), diffusers' "midpoint" form.

    x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D,  D = (1 + 1/(2r)) m_i - 1/(2r) m_{i-1},
    r = h_{i-1} / h; first order (D = m_i, DDIM's update) where `step_order` is 1: the first
    step, and every step for solver_order=1.
    """
    x, m, h, d = _midpoint_data(ctx, carry, i)
    x_next = (ctx.sigma[i + 1] / ctx.sigma[i]) * x - ctx.alpha[i + 1] * jnp.expm1(-h) * d
    return (_finish(ctx, i, x_next, m), m), m


def dpm_solver_pp_2m_sde_step(ctx, carry, i):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, Appendix; k-diffusion's dpmpp_2m_sde with eta = 1,
    diffusers' algorithm_type="sde-dpmsolver++", solver_type="midpoint").

    x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z,
    D = m_i + 1/(2r) (m_i - m_{i-1}) as in 2M (first step: D = m_i); the exact solution of
    the reverse SDE with x0(l) frozen at D. z is the step's noise (`ctx.noise`).
    """
    x, m, h, d = _midpoint_data(ctx, carry, i)
    kept = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h}
    sigma_next = ctx.sigma[i + 1]
    x_next = (
        (sigma_next / ctx.sigma[i]) * jnp.exp(-h) * x
        + ctx.alpha[i + 1] * kept * d
        + sigma_next * jnp.sqrt(kept) * ctx.noise(i, x)
    )
    return (_finish(ctx, i, x_next, m), m), m


def dpm_solver_pp_3m_step(ctx, carry, i):
    """DPM-Solver++(3M) (Lu et al. 2022; diffusers' solver_order=3, algorithm "dpmsolver++").

    With r0 = h_{i-1} / h, r1 = h_{i-2} / h, D1_0 = (m_i - m_{i-1}) / r0,
    D1_1 = (m_{i-1} - m_{i-2}) / r1:
        D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),  D2 = (D1_0 - D1_1) / (r0 + r1),
        x' = (sigma'/sigma) x - alpha' phi_1 m_i + alpha' phi_2 D1 - alpha' phi_3 D2,
    phi_1 = e^{-h} - 1, phi_2 = phi_1 / h + 1, phi_3 = (phi_1 + h) / h^2 - 1/2 (the Taylor
    terms of the integral in the module doc). Where `step_order` is 2 (step 1, and the
    step before the last with lower_order_final) the update is 2M's, x' = linear -
    alpha' phi_1 D1_0 / 2; where it is 1 (step 0), the linear part alone.
    """
    x, m_1, m_2 = carry
    m = ctx.x0(x, i)
    h, h_1, h_2 = _steps(ctx, i)
    order = step_order(ctx, i)
    r0 = _ratio(h_1, h, i >= 1)
    r1 = _ratio(h_2, h, i >= 2)
    phi_1 = jnp.expm1(-h)
    phi_2 = phi_1 / h + 1.0
    phi_3 = (phi_1 + h) / h**2 - 0.5
    d1_0 = (m - m_1) / r0
    d1_1 = (m_1 - m_2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    alpha_next = ctx.alpha[i + 1]
    linear = (ctx.sigma[i + 1] / ctx.sigma[i]) * x - alpha_next * phi_1 * m
    third = linear + alpha_next * (phi_2 * d1 - phi_3 * d2)
    second = linear - alpha_next * phi_1 * 0.5 * d1_0
    x_next = jnp.where(order >= 3, third, jnp.where(order == 2, second, linear))
    return (_finish(ctx, i, x_next, m), m, m_1), m


def _unipc_coefficients(h, variant: str):
    """(phi, B, b1, b2) of UniPC with data prediction for a step h > 0 in lambda.

    phi = e^{-h} - 1; B(h) = -h ("bh1") or e^{-h} - 1 ("bh2") (the paper's B(h) = h or
    e^h - 1 at hh = -h); b_k = k! g_k / B with g_1 = phi / hh - 1, g_2 = g_1 / hh - 1/2, the
    right-hand side of the order conditions (Zhao et al. 2023, Eq. 8; diffusers' b).
    """
    hh = -h
    phi = jnp.expm1(hh)
    if variant == "bh1":
        b = hh
    elif variant == "bh2":
        b = phi
    else:
        raise ValueError(f"unknown unipc_variant {variant!r}; choose one of {UNIPC_VARIANTS}")
    g_1 = phi / hh - 1.0
    g_2 = g_1 / hh - 0.5
    return phi, b, g_1 / b, 2.0 * g_2 / b


def unipc_step(ctx, carry, i):
    """UniPC-2 (Zhao et al. 2023): the UniC-2 corrector, then the UniP-2 predictor, one NFE.

    The carry holds the predictor's x at t_i, the corrected x at t_{i-1} and m_{i-1}, m_{i-2}.
    m_i is evaluated at the predicted x; UniC then redoes the step t_{i-1} -> t_i with m_i
    as an extra point (h = lambda_i - lambda_{i-1}, r = (lambda_{i-2} - lambda_{i-1}) / h):
        x_i = (sigma_i/sigma_{i-1}) x_{i-1} - alpha_i phi m_{i-1}
              - alpha_i B (rho_1 (m_{i-2} - m_{i-1}) / r + rho_2 (m_i - m_{i-1})),
    [[1, 1], [r, 1]] (rho_1, rho_2) = (b1, b2) (UniC-1 on step 1: rho_2 = 1/2, no rho_1);
    m_i is kept for the next step although it was evaluated before the correction, which is
    what makes the corrector free. UniP-2 from the corrected x_i (h = lambda_{i+1} - lambda_i):
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi m_i
                  - alpha_{i+1} B / 2 (m_{i-1} - m_i) / r,  r = (lambda_{i-1} - lambda_i) / h,
    first order on step 0 (diffusers' warm-up, lower_order_final and its rho_p = 1/2 for
    order 2; with B = e^{-h} - 1 this predictor is DPM-Solver++(2M)).
    """
    x_pred, x_prev, m_1, m_2 = carry
    m = ctx.x0(x_pred, i)
    lam, alpha, sigma = ctx.lam, ctx.alpha, ctx.sigma
    prev, prev2 = jnp.maximum(i - 1, 0), jnp.maximum(i - 2, 0)

    # UniC: correct x at t_i (a no-op on step 0, which has no previous step).
    h_c = jnp.where(i >= 1, lam[i] - lam[prev], 1.0)
    phi, b_h, b1, b2 = _unipc_coefficients(h_c, ctx.unipc_variant)
    # r < 0; the placeholder -1 keeps 1 - r away from 0 where there is no m_{i-2}.
    r = jnp.where(i >= 2, (lam[prev2] - lam[prev]) / h_c, -1.0)
    rho_1 = (b1 - b2) / (1.0 - r)
    rho_2 = jnp.where(i >= 2, b1 - rho_1, 0.5)
    d1 = jnp.where(i >= 2, (m_2 - m_1) / r, 0.0)
    corrected = (
        (sigma[i] / sigma[prev]) * x_prev
        - alpha[i] * phi * m_1
        - alpha[i] * b_h * (jnp.where(i >= 2, rho_1, 0.0) * d1 + rho_2 * (m - m_1))
    )
    x = jnp.where(i >= 1, corrected, x_pred)

    # UniP: predict x at t_{i+1}; the last step (h = inf) returns m_i.
    h, _, _ = _steps(ctx, i)
    phi, b_h, _, _ = _unipc_coefficients(h, ctx.unipc_variant)
    r = _ratio(lam[prev] - lam[i], h, i >= 1)
    d1 = jnp.where(i >= 1, (m_1 - m) / r, 0.0)
    x_next = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * phi * m - alpha[i + 1] * b_h * 0.5 * d1
    return (jnp.where(i < ctx.num_steps - 1, x_next, m), x, m, m_1), m
