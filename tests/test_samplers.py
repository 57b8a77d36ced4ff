"""Samplers on Gaussian data N(mu, s^2 I), whose optimal noise predictor is known in closed form:
for x_t = a x_0 + b eps, E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dm

MU, STD = 0.3, 0.5
SHAPE = (4000, 2, 2, 1)  # 16,000 scalar draws: the sample std of the std is ~0.3%


def oracle(sched, mu_of_label=None):
    def model_fn(x, t, labels):
        mu = (
            MU
            if labels is None or mu_of_label is None
            else mu_of_label(labels)[:, None, None, None]
        )
        a = sched.sqrt_alphas_cumprod[t][:, None, None, None]
        b = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        return b * (x - a * mu) / (a * a * STD**2 + b * b)

    return model_fn


@pytest.mark.parametrize(
    "sampler,num_steps,variance,mean_tol,std_tol",
    [
        # Ancestral sampling with the exact posterior mean is exact up to Monte Carlo error.
        ("ddpm", 1000, "fixed_small", 0.01, 0.02),
        ("ddpm", 1000, "fixed_large", 0.01, 0.03),
        # DDIM's Euler steps of the probability-flow ODE shrink the spread at 50 steps by ~5%.
        ("ddim", 50, "fixed_large", 0.01, 0.06),
        ("dpm_solver++", 20, "fixed_large", 0.01, 0.05),
        # Respaced to 100 steps, fixed_large keeps the spread (fixed_small loses ~7% of it,
        # as improved DDPM reports for few steps).
        ("ddpm", 100, "fixed_large", 0.01, 0.03),
    ],
)
def test_oracle_sampler_reproduces_gaussian(sampler, num_steps, variance, mean_tol, std_tol):
    sched = dm.make_schedule("linear", 1000)
    x = dm.sample(
        oracle(sched),
        sched,
        jax.random.key(0),
        shape=SHAPE,
        sampler=sampler,
        num_steps=num_steps,
        variance=variance,
        clip_denoised=False,
    )
    assert x.shape == SHAPE
    assert abs(float(x.mean()) - MU) < mean_tol
    assert abs(float(x.std()) / STD - 1) < std_tol


def test_ddim_eta1_all_steps_equals_ancestral_fixed_small(x64):
    sched = dm.make_schedule("cosine", 200)
    key = jax.random.key(4)
    kw = dict(shape=(64, 2, 2, 1), num_steps=200, clip_denoised=True)
    ancestral = dm.sample(oracle(sched), sched, key, sampler="ddpm", variance="fixed_small", **kw)
    ddim = dm.sample(oracle(sched), sched, key, sampler="ddim", eta=1.0, **kw)
    np.testing.assert_allclose(ddim, ancestral, rtol=1e-7, atol=1e-7)


def test_ddim_eta0_is_deterministic_given_x_T():
    sched = dm.make_schedule("linear", 1000)
    x_T = jax.random.normal(jax.random.key(0), (16, 2, 2, 1))
    a = dm.sample(oracle(sched), sched, jax.random.key(1), x_T=x_T, sampler="ddim", eta=0.0)
    b = dm.sample(oracle(sched), sched, jax.random.key(2), x_T=x_T, sampler="ddim", eta=0.0)
    c = dm.sample(oracle(sched), sched, jax.random.key(2), x_T=x_T, sampler="ddim", eta=0.5)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.parametrize("sampler", list(dm.SAMPLERS))
def test_guidance_zero_is_unconditional_and_one_is_conditional(sampler):
    sched = dm.make_schedule("linear", 1000)
    labels = jnp.arange(32) % 4

    def mu_of_label(y):
        return -0.6 + 0.4 * y

    cond_fn = oracle(sched, mu_of_label)
    kw = dict(
        x_T=jax.random.normal(jax.random.key(0), (32, 2, 2, 1)),
        sampler=sampler,
        num_steps=20,
        clip_denoised=False,
    )
    key = jax.random.key(1)
    uncond = dm.sample(oracle(sched), sched, key, **kw)
    w0 = dm.sample(cond_fn, sched, key, labels=labels, guidance_scale=0.0, **kw)
    w1 = dm.sample(cond_fn, sched, key, labels=labels, guidance_scale=1.0, **kw)
    cond = dm.sample(cond_fn, sched, key, labels=labels, **kw)
    np.testing.assert_allclose(w0, uncond, atol=1e-5)
    np.testing.assert_allclose(w1, cond, atol=1e-5)
    # The conditional samples sit at their label's mean.
    per_label = [float(cond[labels == y].mean()) for y in range(4)]
    assert np.all(np.diff(per_label) > 0.2)


def test_trajectory_of_x0_predictions():
    sched = dm.make_schedule("linear", 1000)
    x, traj = dm.sample(
        oracle(sched),
        sched,
        jax.random.key(0),
        shape=(8, 2, 2, 1),
        sampler="ddim",
        num_steps=10,
        return_x0_at=(0, 5, 9),
    )
    assert traj.shape == (3, 8, 2, 2, 1)
    # The first x0 prediction from pure noise is near the data mean; the last is the output.
    assert abs(float(traj[0].mean()) - MU) < 0.05
    np.testing.assert_allclose(traj[-1], x, atol=1e-6)
    # Kept for the first rows only, the predictions are those rows of the whole batch's.
    for sampler in ("ddim", "heun"):
        kw = dict(shape=(8, 2, 2, 1), sampler=sampler, num_steps=10, return_x0_at=(0, 4, 9))
        _, full = dm.sample(oracle(sched), sched, jax.random.key(1), **kw)
        _, rows = dm.sample(oracle(sched), sched, jax.random.key(1), return_x0_rows=3, **kw)
        assert rows.shape == (3, 3, 2, 2, 1)
        np.testing.assert_allclose(rows, full[:, :3], atol=1e-6)


def test_respaced_timesteps():
    np.testing.assert_array_equal(dm.respaced_timesteps(1000, 5), [999, 749, 500, 250, 0])
    np.testing.assert_array_equal(dm.respaced_timesteps(1000, 4, "trailing"), [999, 749, 499, 249])
    quad = dm.respaced_timesteps(1000, 10, "quadratic")
    assert quad[0] == int(np.sqrt(800) ** 2) and quad[-1] == 0 and np.all(np.diff(quad) < 0)
    with pytest.raises(ValueError, match="sampling.num_steps"):
        dm.respaced_timesteps(10, 11)
    with pytest.raises(ValueError, match="sampling.spacing"):
        dm.respaced_timesteps(10, 5, "cubic")


def test_unknown_sampler_names_the_field():
    sched = dm.make_schedule("linear", 50)
    with pytest.raises(ValueError, match="^sampler: unknown 'lms'"):
        dm.sample(oracle(sched), sched, jax.random.key(0), shape=(1, 1), sampler="lms")
