"""Loss terms against closed forms and numerical integrals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion_jax import diffusion as dm


def test_gaussian_kl_of_equal_gaussians_is_zero(x64):
    m = jnp.linspace(-2, 2, 7)
    lv = jnp.linspace(-3, 1, 7)
    np.testing.assert_allclose(dm.normal_kl(m, lv, m, lv), 0.0, atol=1e-15)


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.3, 0.5, -0.2, 1.3), (1.0, 2.0, 0.0, 0.7)])
def test_gaussian_kl_matches_numerical_integral(x64, m1, s1, m2, s2):
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    expected, _ = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -30, 30)
    got = dm.normal_kl(m1, 2 * np.log(s1), m2, 2 * np.log(s2))
    np.testing.assert_allclose(float(got), expected, rtol=1e-7)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -5.0), (-0.99, -1.0), (2.0, 0.5)])
def test_discretized_decoder_probabilities_sum_to_one(x64, mean, log_scale):
    bins = jnp.linspace(-1.0, 1.0, 256)
    logp = dm.discretized_gaussian_log_likelihood(bins, mean, log_scale)
    np.testing.assert_allclose(float(jnp.exp(logp).sum()), 1.0, atol=1e-9)


def test_discretized_decoder_matches_exact_normal_cdf(x64):
    """The tanh approximation of Phi stays within 2e-3 of scipy's exact CDF per bin."""
    bins = np.linspace(-1.0, 1.0, 256)
    mean, scale = 0.1, 0.05
    got = np.exp(
        np.asarray(dm.discretized_gaussian_log_likelihood(jnp.asarray(bins), mean, np.log(scale)))
    )
    upper = np.where(bins > 0.999, np.inf, bins + 1 / 255)
    lower = np.where(bins < -0.999, -np.inf, bins - 1 / 255)
    exact = stats.norm.cdf(upper, mean, scale) - stats.norm.cdf(lower, mean, scale)
    assert np.abs(got - exact).max() < 2e-3


def test_l_simple_is_mse_on_the_target(x64):
    sched = dm.make_schedule("linear", 1000)
    key = jax.random.key(0)
    x0 = jax.random.normal(key, (4, 3, 3, 2))
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([3, 100, 500, 999])
    xt = dm.q_sample(sched, x0, t, noise)
    out = jax.random.normal(jax.random.fold_in(key, 2), x0.shape)
    for prediction, target in [
        ("eps", noise),
        ("x0", x0),
        ("v", dm.v_from_x0_eps(sched, x0, noise, t)),
    ]:
        loss, _ = dm.diffusion_loss(sched, out, x0, xt, t, noise, prediction=prediction)
        np.testing.assert_allclose(loss, ((out - target) ** 2).mean(axis=(1, 2, 3)), rtol=1e-12)


def test_snr_weightings_in_x0_space(x64):
    """Each weighting, applied to any target, equals its x0-space weight times the x0 MSE."""
    sched = dm.make_schedule("cosine", 1000)
    key = jax.random.key(1)
    x0 = jax.random.normal(key, (5, 2, 2, 1))
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([0, 10, 300, 700, 999])
    xt = dm.q_sample(sched, x0, t, noise)
    x0_hat = x0 + 0.1 * jax.random.normal(jax.random.fold_in(key, 2), x0.shape)
    x0_mse = np.asarray(((x0_hat - x0) ** 2).mean(axis=(1, 2, 3)))
    snr = np.asarray(sched.alphas_cumprod)[np.asarray(t)]
    snr = snr / (1 - snr)
    expected = {"snr": snr, "min_snr": np.minimum(snr, 5.0), "truncated_snr": np.maximum(snr, 1.0)}
    eps_hat = dm.eps_from_x0(sched, xt, t, x0_hat)
    outputs = {"x0": x0_hat, "eps": eps_hat, "v": dm.v_from_x0_eps(sched, x0_hat, eps_hat, t)}
    for weighting, w in expected.items():
        for prediction, output in outputs.items():
            loss, _ = dm.diffusion_loss(
                sched, output, x0, xt, t, noise, prediction=prediction, weighting=weighting
            )
            np.testing.assert_allclose(loss, w * x0_mse, rtol=1e-6, err_msg=weighting + prediction)


def test_hybrid_loss_stops_the_gradient_of_the_mean_through_the_vlb(x64):
    sched = dm.make_schedule("cosine", 100)
    key = jax.random.key(2)
    x0 = jnp.tanh(jax.random.normal(key, (3, 2, 2, 1)))
    noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
    t = jnp.array([0, 40, 99])
    xt = dm.q_sample(sched, x0, t, noise)
    out = jax.random.normal(jax.random.fold_in(key, 2), x0.shape[:-1] + (2,))

    def loss(out, loss_type):
        return dm.diffusion_loss(
            sched, out, x0, xt, t, noise, variance="learned_range", loss_type=loss_type
        )[0].sum()

    hybrid = jax.grad(loss)(out, "hybrid")
    mse_only = jax.grad(lambda o: ((o[..., :1] - noise) ** 2).mean(axis=(1, 2, 3)).sum())(out)
    np.testing.assert_allclose(hybrid[..., :1], mse_only[..., :1], rtol=1e-12)
    assert float(jnp.abs(hybrid[..., 1:]).max()) > 0
    kl = jax.grad(loss)(out, "kl")
    assert float(jnp.abs(kl[..., :1]).max()) > 0
    _, terms = dm.diffusion_loss(
        sched, out, x0, xt, t, noise, variance="learned_range", loss_type="hybrid"
    )
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"] / 1000.0)


def test_prior_bpd_against_closed_form(x64):
    sched = dm.make_schedule("linear", 1000)
    x0 = jnp.full((1, 2, 2, 1), 0.5)
    abar = float(sched.alphas_cumprod[-1])
    mean, var = np.sqrt(abar) * 0.5, 1 - abar
    kl = 0.5 * (var + mean**2 - 1 - np.log(var))
    np.testing.assert_allclose(float(dm.prior_bpd(sched, x0)[0]), kl / np.log(2), rtol=1e-9)


def test_sample_timesteps_uniform():
    t = dm.sample_timesteps(jax.random.key(0), 100_000, 10)
    counts = np.bincount(np.asarray(t), minlength=10)
    assert t.dtype == jnp.int32 and counts.min() > 9_500 and counts.max() < 10_500
