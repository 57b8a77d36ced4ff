"""Power-function EMA profiles and their post-hoc reconstruction (EDM2, Karras et al. 2024,
section 3 and appendix C).

A power-function EMA with exponent gamma averages the training trajectory theta(tau) up to
time t with the profile

    p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,            (EDM2 eq. 121)

so its length grows with training. Tracked step by step (t = 1, 2, ... updates) it is

    theta_hat(t) = beta_t theta_hat(t - 1) + (1 - beta_t) theta(t),
    beta_t = (1 - 1/t)^(gamma + 1)                                                 (eq. 127)

and beta_1 = 0 starts it at the first updated parameters. Its width is given as
sigma_rel, the profile's standard deviation relative to t:

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))                    (eq. 123)

Snapshots of a few tracked profiles at several times span a space of profiles; the
least-squares combination of the snapshots closest to any other profile (time, sigma_rel)
solves A x = b with A the inner products <p_i, p_j> of the snapshot profiles and b their
inner products with the target (Algorithm 3); the weights, normalised to sum to 1, combine
the snapshots' parameters into the target's. Everything here is float64 NumPy on the host:
a handful of numbers per snapshot.
"""

from __future__ import annotations

import numpy as np

# The exponent is real and positive below this sigma_rel (gamma -> 0 at 1 / sqrt(12)).
MAX_SIGMA_REL = float(np.sqrt(1.0 / 12.0))


def gamma_to_sigma_rel(gamma) -> np.ndarray:
    """sigma_rel of the power function with exponent `gamma` (eq. 123)."""
    g = np.float64(gamma)
    return np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel) -> np.ndarray:
    """The exponent of the power function with relative width `sigma_rel` in (0, 1/sqrt(12)).

    Squaring eq. 123 gives the cubic gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0
    (eq. 126); its largest real root is the exponent (e.g. 0.05 -> 16.97, 0.10 -> 6.94)."""
    s = np.asarray(sigma_rel, np.float64)
    if np.any((s <= 0) | (s >= MAX_SIGMA_REL)):
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), not {sigma_rel}")
    inv = s.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - a, 12.0 - a]).real.max() for a in inv]
    return np.float64(roots).reshape(s.shape)


def power_ema_beta(t, gamma):
    """beta_t = (1 - 1/t)^(gamma + 1) of the update after `t` >= 1 optimizer updates (eq. 127).

    `t` may be a traced integer scalar (the train step's update count): the result follows
    its array library, float32."""
    t = t.astype("float32") if hasattr(t, "astype") else np.float32(t)
    return (1.0 - 1.0 / t) ** (np.float32(gamma) + 1.0)


def profile_inner_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_{t_a, gamma_a}(tau) p_{t_b, gamma_b}(tau) over tau, in closed
    form (eq. 151): (ga + 1)(gb + 1) (t_a / t_b)^e / ((ga + gb + 1) max(t_a, t_b)), where
    e = gb if t_a < t_b else -ga. Arguments broadcast against each other."""
    t_a, t_b = np.float64(t_a), np.float64(t_b)
    g_a, g_b = np.float64(gamma_a), np.float64(gamma_b)
    exponent = np.where(t_a < t_b, g_b, -g_a)
    numerator = (g_a + 1.0) * (g_b + 1.0) * (t_a / t_b) ** exponent
    return numerator / ((g_a + g_b + 1.0) * np.maximum(t_a, t_b))


def posthoc_weights(snapshot_t, snapshot_gamma, target_t, target_gamma) -> np.ndarray:
    """Weights (num_snapshots, num_targets), each column summing to 1, that combine snapshots
    taken at times `snapshot_t` of profiles with exponents `snapshot_gamma` (both
    (num_snapshots,)) into the profiles (target_t, target_gamma) (both (num_targets,) or
    scalars): the least-squares solution A x = b of Algorithm 3.

    A is symmetric positive semi-definite; a snapshot repeated (same time and exponent)
    makes it singular, so the minimum-norm least-squares solution is taken."""
    t_i, g_i = np.broadcast_arrays(np.float64(snapshot_t), np.float64(snapshot_gamma))
    t_r, g_r = np.broadcast_arrays(np.float64(target_t), np.float64(target_gamma))
    t_i, g_i = t_i.reshape(-1, 1), g_i.reshape(-1, 1)
    gram = profile_inner_products(t_i, g_i, t_i.T, g_i.T)
    rhs = profile_inner_products(t_i, g_i, t_r.reshape(1, -1), g_r.reshape(1, -1))
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return x / x.sum(axis=0, keepdims=True)
