"""Schedules and their coefficients against float64 NumPy formulas written here."""

import math

import numpy as np
import pytest

from diffusion_jax import diffusion as dm


def reference_coefficients(betas):
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "alphas": alphas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        "snr": abar / (1.0 - abar),
    }


def reference_betas(name, T):
    if name == "linear":
        return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    if name == "scaled_linear":
        return np.linspace(math.sqrt(0.00085), math.sqrt(0.012), T) ** 2
    if name == "cosine":
        f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
        return np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)])
    if name == "sigmoid":

        def sig(z):
            return 1 / (1 + math.exp(-z))

        def abar(s):
            return max((sig(3) - sig(6 * s - 3)) / (sig(3) - sig(-3)), 1e-9)

        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)])
    raise AssertionError(name)


@pytest.mark.parametrize("name", dm.SCHEDULES)
@pytest.mark.parametrize("T", [1000, 4000, 37])
def test_schedule_coefficients_match_numpy(x64, name, T):
    sched = dm.make_schedule(name, T)
    betas = reference_betas(name, T)
    np.testing.assert_allclose(np.asarray(sched.betas), betas, rtol=1e-12, atol=1e-15)
    for field, expected in reference_coefficients(betas).items():
        np.testing.assert_allclose(
            np.asarray(getattr(sched, field)), expected, rtol=1e-9, err_msg=f"{name}.{field}"
        )
    assert sched.num_timesteps == T


def test_linear_schedule_is_ddpm_at_1000():
    sched = dm.make_schedule("linear", 1000)
    assert np.isclose(float(sched.betas[0]), 1e-4)
    assert np.isclose(float(sched.betas[-1]), 0.02)


def test_cosine_alphas_cumprod_is_cos_squared(x64):
    T, s = 1000, 0.008
    sched = dm.make_schedule("cosine", T)
    t = np.arange(1, T + 1)
    f = np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2 / np.cos(s / (1 + s) * np.pi / 2) ** 2
    abar = np.asarray(sched.alphas_cumprod)
    # Away from the end, where clipping at 0.999 applies, abar_t is exactly f(t)/f(0).
    np.testing.assert_allclose(abar[:-20], f[:-20], rtol=1e-9)
    assert np.all(np.asarray(sched.betas) <= 0.999)


def test_float32_by_default():
    assert dm.make_schedule("linear", 50).betas.dtype == np.float32


def test_betas_outside_unit_interval_are_refused():
    with pytest.raises(ValueError, match="diffusion.num_timesteps=10"):
        dm.make_schedule("linear", 10)  # 1000/T scaling would give beta_T = 2


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="diffusion.schedule"):
        dm.make_schedule("quadratic", 10)
