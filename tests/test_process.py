"""The forward process, its posterior and the parameterizations, against independent formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dm
from diffusion_jax.diffusion import process


def test_q_sample_marginal_equals_composed_one_step_kernels(x64):
    """Composing q(x_s|x_{s-1}) = N(sqrt(alpha_s) x, beta_s) t+1 times, for a Gaussian x_0,
    gives mean prod sqrt(alpha) mu and variance by the recursion v <- alpha v + beta."""
    sched = dm.make_schedule("cosine", 200)
    betas = np.asarray(sched.betas)
    mu0, var0 = 0.7, 0.2**2
    for t in [0, 5, 99, 199]:
        mean, var = mu0, var0
        for s in range(t + 1):
            mean = np.sqrt(1 - betas[s]) * mean
            var = (1 - betas[s]) * var + betas[s]
        # The closed form, applied to samples, must reproduce the same moments.
        key = jax.random.key(t)
        x0 = mu0 + np.sqrt(var0) * jax.random.normal(key, (400_000, 1, 1, 1))
        noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
        xt = dm.q_sample(sched, x0, jnp.full((x0.shape[0],), t), noise)
        assert abs(float(xt.mean()) - mean) < 5 * np.sqrt(var / 400_000)
        assert abs(float(xt.var()) / var - 1) < 0.01
        # And q_mean_variance equals the composition exactly.
        m, v, logv = dm.q_mean_variance(sched, jnp.full((1, 1), 1.0), jnp.array([t]))
        np.testing.assert_allclose(float(m[0, 0]), mean / mu0, rtol=1e-10)
        np.testing.assert_allclose(float(v[0, 0]), 1 - np.prod(1 - betas[: t + 1]), rtol=1e-10)
        np.testing.assert_allclose(float(logv[0, 0]), np.log(float(v[0, 0])), rtol=1e-10)


def test_q_posterior_is_bayes_rule(x64):
    """p(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    sched = dm.make_schedule("linear", 1000)
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(6, 3))
    xt = rng.normal(size=(6, 3))
    t = np.array([1, 2, 10, 500, 998, 999])
    mean, var, logvar = dm.q_posterior(sched, jnp.asarray(x0), jnp.asarray(xt), jnp.asarray(t))
    betas = np.asarray(sched.betas, np.float64)
    abar = np.cumprod(1 - betas)
    for i, ti in enumerate(t):
        # Likelihood in x_{t-1}: x_t ~ N(sqrt(a) x_{t-1}, b) -> precision a/b, mean x_t/sqrt(a).
        a, b = 1 - betas[ti], betas[ti]
        prior_mean, prior_var = np.sqrt(abar[ti - 1]) * x0[i], 1 - abar[ti - 1]
        precision = a / b + 1 / prior_var
        post_var = 1 / precision
        post_mean = post_var * (np.sqrt(a) * xt[i] / b + prior_mean / prior_var)
        np.testing.assert_allclose(np.asarray(mean[i]), post_mean, rtol=1e-8)
        np.testing.assert_allclose(float(var[i, 0]), post_var, rtol=1e-8)
        np.testing.assert_allclose(float(logvar[i, 0]), np.log(post_var), rtol=1e-8)


def test_posterior_log_variance_is_clipped_at_t0(x64):
    sched = dm.make_schedule("linear", 1000)
    _, var, logvar = dm.q_posterior(sched, jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.array([0]))
    assert float(var[0, 0]) == 0.0
    np.testing.assert_allclose(float(logvar[0, 0]), np.log(float(sched.posterior_variance[1])))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_parameterizations_are_mutual_inverses(x64, name):
    sched = dm.make_schedule(name, 1000)
    key = jax.random.key(0)
    x0 = jax.random.normal(key, (16, 4, 4, 2))
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.arange(0, 1000, 1000 // 16)[:16]
    xt = dm.q_sample(sched, x0, t, eps)
    v = dm.v_from_x0_eps(sched, x0, eps, t)
    np.testing.assert_allclose(dm.x0_from_eps(sched, xt, t, eps), x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dm.eps_from_x0(sched, xt, t, x0), eps, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dm.x0_from_v(sched, xt, t, v), x0, atol=1e-9)
    np.testing.assert_allclose(dm.eps_from_v(sched, xt, t, v), eps, atol=1e-9)
    for prediction, output in [("eps", eps), ("x0", x0), ("v", v)]:
        got_x0, got_eps = process.x0_eps_from_prediction(sched, prediction, output, xt, t)
        np.testing.assert_allclose(got_x0, x0, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_eps, eps, rtol=1e-6, atol=1e-6)


def test_p_mean_variance_of_true_eps_is_the_posterior(x64):
    sched = dm.make_schedule("linear", 1000)
    key = jax.random.key(3)
    x0 = jnp.tanh(jax.random.normal(key, (8, 2, 2, 3)))
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([0, 1, 2, 50, 400, 800, 998, 999])
    xt = dm.q_sample(sched, x0, t, eps)
    post_mean, post_var, _ = dm.q_posterior(sched, x0, xt, t)
    betas = np.asarray(sched.betas)
    large = np.append(np.asarray(sched.posterior_variance)[1], betas[1:])
    for variance, expected_var in [
        ("fixed_small", np.asarray(sched.posterior_variance)[np.asarray(t)]),
        ("fixed_large", large[np.asarray(t)]),
    ]:
        out = dm.p_mean_variance(sched, eps, xt, t, variance=variance, clip_denoised=False)
        np.testing.assert_allclose(out["mean"], post_mean, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(out["variance"][:, 0, 0, 0], expected_var, rtol=1e-10)
        np.testing.assert_allclose(out["pred_x0"], x0, atol=1e-6)
    # learned_range interpolates log beta~ (v=-1) and log beta (v=+1) (Eq. 15, improved DDPM).
    for v, expected in [
        (-1.0, np.asarray(sched.posterior_log_variance_clipped)),
        (1.0, np.log(betas)),
    ]:
        out = dm.p_mean_variance(
            sched,
            jnp.concatenate([eps, jnp.full_like(eps, v)], -1),
            xt,
            t,
            variance="learned_range",
            clip_denoised=False,
        )
        np.testing.assert_allclose(
            out["log_variance"][:, 0, 0, 0], expected[np.asarray(t)], rtol=1e-10
        )
        np.testing.assert_allclose(out["mean"], post_mean, rtol=1e-6, atol=1e-8)


def test_clip_denoised_bounds_x0():
    sched = dm.make_schedule("linear", 1000)
    xt = 5.0 * jnp.ones((2, 2, 2, 1))
    t = jnp.array([10, 900])
    out = dm.p_mean_variance(sched, -jnp.ones_like(xt), xt, t, clip_denoised=True)
    assert float(jnp.abs(out["pred_x0"]).max()) <= 1.0


def test_unknown_prediction_names_the_field():
    sched = dm.make_schedule("linear", 50)
    x = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="diffusion.prediction"):
        dm.p_mean_variance(sched, x, x, jnp.array([0]), prediction="score")
    with pytest.raises(ValueError, match="diffusion.variance"):
        dm.p_mean_variance(sched, x, x, jnp.array([0]), variance="huge")
