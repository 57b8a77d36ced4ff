"""bits/dim: the scanned bound against a plain float64 loop over its terms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion as dm

MU, STD = 0.1, 0.4


def oracle(sched):
    def model_fn(x, t, labels):
        a = sched.sqrt_alphas_cumprod[t][:, None, None, None]
        b = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        return b * (x - a * MU) / (a * a * STD**2 + b * b)

    return model_fn


def reference_bound(sched, x0, key, model_fn):
    """Prior + sum of KLs + decoder NLL, one term at a time with NumPy in float64."""
    T = sched.num_timesteps
    betas = np.asarray(sched.betas, np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    large = np.append(post_var[1], betas[1:])
    x0n = np.asarray(x0, np.float64)
    dims = x0n[0].size
    total = np.zeros(x0n.shape[0])
    m, v = np.sqrt(abar[-1]) * x0n, 1 - abar[-1]
    total += (0.5 * (v + m**2 - 1 - np.log(v))).reshape(len(x0n), -1).sum(1) / dims / math.log(2)
    for t in range(T):
        noise = np.asarray(jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype))
        xt = np.sqrt(abar[t]) * x0n + np.sqrt(1 - abar[t]) * noise
        eps = np.asarray(model_fn(jnp.asarray(xt), jnp.full((len(x0n),), t), None))
        x0_hat = (xt - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        c1 = betas[t] * np.sqrt(abar_prev[t]) / (1 - abar[t])
        c2 = (1 - abar_prev[t]) * np.sqrt(1 - betas[t]) / (1 - abar[t])
        p_mean = c1 * x0_hat + c2 * xt
        if t == 0:
            sd = np.sqrt(large[0])
            upper = np.where(x0n > 0.999, np.inf, x0n + 1 / 255)
            lower = np.where(x0n < -0.999, -np.inf, x0n - 1 / 255)
            prob = stats.norm.cdf(upper, p_mean, sd) - stats.norm.cdf(lower, p_mean, sd)
            term = -np.log(prob)
        else:
            q_mean = c1 * x0n + c2 * xt
            term = 0.5 * (
                np.log(large[t] / post_var[t])
                - 1
                + post_var[t] / large[t]
                + (q_mean - p_mean) ** 2 / large[t]
            )
        total += term.reshape(len(x0n), -1).mean(1) / math.log(2)
    return total


def test_scanned_bound_equals_loop(x64):
    sched = dm.make_schedule("linear", 100)
    key = jax.random.key(0)
    x0 = jnp.round((MU + STD * jax.random.normal(key, (4, 3, 3, 1))).clip(-1, 1) * 127.5) / 127.5
    out = dm.bits_per_dim(oracle(sched), sched, x0, jax.random.key(1), clip_denoised=False)
    expected = reference_bound(sched, x0, jax.random.key(1), oracle(sched))
    # The decoder uses the tanh approximation of Phi, which the reference does not.
    np.testing.assert_allclose(out["bpd"], expected, rtol=2e-3)
    np.testing.assert_allclose(out["prior_bpd"] + out["terms_bpd"].sum(1), out["bpd"])


@pytest.mark.parametrize("T", [1000])
def test_oracle_bound_is_finite_and_kl_terms_nonnegative(T):
    sched = dm.make_schedule("linear", T)
    key = jax.random.key(2)
    x0 = jnp.round((MU + STD * jax.random.normal(key, (8, 4, 4, 1))).clip(-1, 1) * 127.5) / 127.5
    out = dm.bits_per_dim(oracle(sched), sched, x0, jax.random.key(3), clip_denoised=False)
    assert out["terms_bpd"].shape == (8, T)
    assert bool(jnp.all(jnp.isfinite(out["bpd"])))
    assert float(out["terms_bpd"][:, 1:].min()) >= -1e-6
    assert float(out["prior_bpd"].min()) >= 0
    # A Gaussian of std s on 256 bins of width 2/255 has entropy ~log2(s sqrt(2 pi e) / (2/255)).
    entropy_bits = math.log2(STD * math.sqrt(2 * math.pi * math.e) / (2 / 255))
    assert abs(float(out["bpd"].mean()) - entropy_bits) < 0.5
