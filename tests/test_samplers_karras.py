"""The multistep (DPM-Solver++ 2M SDE / 3M, UniPC) and Karras (Euler, Heun) samplers.

Two kinds of checks:
- against short float64 NumPy implementations of each algorithm, written here in the form of
  the papers and of diffusers/EDM (lists of past outputs, the UniPC order conditions solved by
  np.linalg.solve), on a nonlinear toy model;
- on Gaussian data x0 ~ N(mu, diag(s^2)), whose denoiser is known in closed form: for
  x_t = a x0 + b eps, E[x0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2), and whose
  probability-flow ODE is solved exactly in sigma = b / a and x_sigma = x_t / a:
  x_sigma(sigma) - mu = sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)) (x_sigma(sigma_0) - mu).
  Every sampler ends with the x0 prediction at its last timestep t_L (the step into sigma =
  0), so its exact counterpart is D(x(sigma_L); sigma_L), whose law from the true marginal is
  N(mu, s^4 / (s^2 + sigma_L^2)): the data, slightly shrunk when sigma_L is not small.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dm
from diffusion_jax.diffusion import karras

MU = np.array([0.5, -1.0])
S = np.array([0.3, 0.8])
KARRAS = ("euler", "heun")


def gaussian_oracle(sched, prediction="eps"):
    """The exact model output (eps, x0 or v) for Gaussian data; x (B, 2), t (B,)."""

    def model_fn(x, t, labels):
        # Cast here: the tests switch float64 on and off, and a NumPy constant shared by
        # programs traced under both must not carry one program's dtype into the other.
        mu, s = jnp.asarray(MU, x.dtype), jnp.asarray(S, x.dtype)
        a = sched.sqrt_alphas_cumprod[t][:, None]
        b = sched.sqrt_one_minus_alphas_cumprod[t][:, None]
        eps = b * (x - a * mu) / (a * a * s**2 + b * b)
        x0 = (x - b * eps) / a
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction]

    return model_fn


def exact_output(abar, x_T, t_first, t_last):
    """D(x(sigma_L); sigma_L) for the exact ODE solution from x_T at t_first (module doc)."""
    var_first = (1.0 - abar[t_first]) / abar[t_first]
    var_last = (1.0 - abar[t_last]) / abar[t_last]
    scale = S**2 / np.sqrt((S**2 + var_last) * (S**2 + var_first))
    return MU + scale * (x_T / np.sqrt(abar[t_first]) - MU)


def target_std(abar, t_last):
    """The std of D(x; sigma_L) for x from the true marginal at t_last (module doc)."""
    return S**2 / np.sqrt(S**2 + (1.0 - abar[t_last]) / abar[t_last])


# --- float64 NumPy references ----------------------------------------------------------------
# x0_fn(x, t) -> the x0 prediction. They use only sums and products of x with numbers, so
# they also run on "affine" samples: x of shape (n, d) holding the coefficients of
# x = c_0 + c_1 x_T + sum_i c_{2+i} z_i, the oracle adding its constant to row 0. Row 0 is
# then the exact mean of the output and the sum of squares of the others its variance.


def _grid(abar, ts):
    alpha = np.sqrt(np.append(abar[ts], 1.0))
    sigma = np.sqrt(np.append(1.0 - abar[ts], 0.0))
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def ref_dpm_solver_pp(x0_fn, abar, ts, x, kind, noise=None):
    """DPM-Solver++ 2M ("2m"), SDE-2M ("2m_sde", noise[i] per step) or 3M ("3m"), with the
    first steps at lower orders and the last returning the x0 prediction (diffusers with
    final_sigmas_type="zero")."""
    alpha, sigma, lam = _grid(abar, ts)
    ms = []
    for i in range(len(ts)):
        ms.append(x0_fn(x, ts[i]))
        if i == len(ts) - 1:
            return ms[-1]
        h = lam[i + 1] - lam[i]
        order = min(i + 1, 3 if kind == "3m" else 2)
        m0 = ms[-1]
        if order == 1:
            d = m0
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (m0 - ms[-2]) / r0
            d = m0 + 0.5 * d1_0
        if kind == "2m_sde":
            x = (
                sigma[i + 1] / sigma[i] * np.exp(-h) * x
                + alpha[i + 1] * (1.0 - np.exp(-2.0 * h)) * d
                + sigma[i + 1] * np.sqrt(1.0 - np.exp(-2.0 * h)) * noise[i]
            )
        elif order < 3:
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (np.exp(-h) - 1.0) * d
        else:
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_1 = (ms[-2] - ms[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = (
                sigma[i + 1] / sigma[i] * x
                - alpha[i + 1] * (np.exp(-h) - 1.0) * m0
                + alpha[i + 1] * ((np.exp(-h) - 1.0) / h + 1.0) * d1
                - alpha[i + 1] * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5) * d2
            )
    raise AssertionError("unreachable")


def _unipc_terms(h, order, variant, rks):
    """h phi_1, B(h), R and b of the UniPC order conditions (Zhao et al. 2023, Eq. 8)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if variant == "bh1" else np.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1.0, 1
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append(np.asarray(rks) ** (k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, np.array(rows), np.array(rhs)


def ref_unipc(x0_fn, abar, ts, x, variant):
    """UniPC with solver_order=2, data prediction, lower_order_final (diffusers' step())."""
    alpha, sigma, lam = _grid(abar, ts)
    num = len(ts)
    ms, last_x, last_order = [], None, None
    for i in range(num):
        m = x0_fn(x, ts[i])
        if i > 0:  # UniC with the order of the predictor that made x
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, last_order)] + [1.0]
            d1s = [(ms[-1 - k] - ms[-1]) / rks[k - 1] for k in range(1, last_order)]
            h_phi_1, b_h, rows, rhs = _unipc_terms(h, last_order, variant, rks)
            rhos = np.array([0.5]) if last_order == 1 else np.linalg.solve(rows, rhs)
            res = sum(r * d for r, d in zip(rhos[:-1], d1s, strict=True)) + rhos[-1] * (m - ms[-1])
            x = sigma[i] / sigma[i - 1] * last_x - alpha[i] * h_phi_1 * ms[-1]
            x = x - alpha[i] * b_h * res
        ms.append(m)
        order = min(2, num - i, i + 1)
        last_x, last_order = x, order
        if i == num - 1:  # h = inf: the predictor's limit is m
            return m
        h = lam[i + 1] - lam[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)] + [1.0]
        d1s = [(ms[-1 - k] - ms[-1]) / rks[k - 1] for k in range(1, order)]
        h_phi_1, b_h, _, _ = _unipc_terms(h, order, variant, rks)
        res = 0.5 * d1s[0] if order == 2 else 0.0
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * h_phi_1 * ms[-1] - alpha[i + 1] * b_h * res
    raise AssertionError("unreachable")


# EDM's sigma_max: the top of dm.sample's Karras grids under the project's conventions, when
# the schedule's own sigma at T - 1 is higher (157 for linear at T = 1000).
PROJECT_SIGMA_MAX = 80.0


def ref_karras_timesteps(abar, num, rho=7.0, sigma_max=None):
    """Karras sigmas (Eq. 5 of Karras et al.) from min(sigma_{T-1}, sigma_max) down to
    sigma_0, rounded to the nearest timestep in log sigma, repeats pushed apart from the end."""
    table = np.sqrt((1.0 - abar) / abar)
    ramp = np.linspace(0.0, 1.0, num) if num > 1 else np.zeros(1)
    top = table[-1] if sigma_max is None else min(table[-1], sigma_max)
    lo, hi = table[0] ** (1 / rho), top ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    ts = np.abs(np.log(table)[None, :] - np.log(sigmas)[:, None]).argmin(axis=1)
    for i in range(num - 2, -1, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    return np.minimum(ts, len(abar) - 1 - np.arange(num))


def ref_edm(x0_fn, abar, ts, x_T, heun, churn=(0.0, 0.0, np.inf, 1.0), noise=None):
    """EDM Algorithm 2 (Algorithm 1 without churn) in x_sigma = x_t / sqrt(abar), every sigma
    rounded to a timestep; the last step (to sigma = 0) is an Euler step."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    table = np.sqrt((1.0 - abar) / abar)
    sigmas = np.append(table[ts], 0.0)
    num = len(ts)

    def denoise(x, t):
        return x0_fn(x * np.sqrt(abar[t]), t)

    x = x_T / np.sqrt(abar[ts[0]])
    for i in range(num):
        gamma = min(s_churn / num, np.sqrt(2) - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        t_hat = int(np.abs(np.log(table) - np.log(sigmas[i] * (1 + gamma))).argmin())
        t_hat, s_hat = (t_hat, table[t_hat]) if t_hat > ts[i] else (ts[i], sigmas[i])
        if s_hat > sigmas[i]:
            x = x + np.sqrt(s_hat**2 - sigmas[i] ** 2) * s_noise * noise[i]
        d = (x - denoise(x, t_hat)) / s_hat
        x_next = x + (sigmas[i + 1] - s_hat) * d
        if heun and i < num - 1:
            d_next = (x_next - denoise(x_next, ts[i + 1])) / sigmas[i + 1]
            x_next = x + (sigmas[i + 1] - s_hat) * 0.5 * (d + d_next)
        x = x_next
    return x


# --- helpers ---------------------------------------------------------------------------------


def toy_eps(x, t, xp):
    """A nonlinear eps-prediction model, in NumPy (xp=np, scalar t) or JAX (t (B,))."""
    scale = 0.5 + 0.4 * xp.cos(t / 300.0)
    if xp is jnp:
        scale = scale[:, None]
    return scale * xp.tanh(x) + 0.1 * x


def np_x0_from_eps(abar, eps_fn):
    def x0_fn(x, t):
        return (x - np.sqrt(1.0 - abar[t]) * eps_fn(x, t)) / np.sqrt(abar[t])

    return x0_fn


def step_noise(key, num, shape):
    """The noise `sample` draws for step i: normal(fold_in(fold_in(key, 1), i))."""
    key = jax.random.fold_in(key, 1)
    return [np.asarray(jax.random.normal(jax.random.fold_in(key, i), shape)) for i in range(num)]


def lambda_uniform_timesteps(abar, num, lam_end):
    """num timesteps from T - 1 whose lambda = log(alpha / sigma) is nearest a uniform grid
    up to lam_end: a grid that refines smoothly in lambda, as an order study needs (the
    default spacings keep the last step's lambda ratio fixed)."""
    lam = 0.5 * np.log(abar / (1.0 - abar))
    targets = np.linspace(lam[-1], lam_end, num)
    ts = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    assert len(np.unique(ts)) == num
    return ts


def affine_gaussian_x0(abar, basis):
    """The Gaussian oracle's x0 prediction on affine samples (rows: coefficients)."""
    const = np.zeros((basis, 1))
    const[0] = 1.0

    def x0_fn(x, t):
        a, b2 = np.sqrt(abar[t]), 1.0 - abar[t]
        gain = a * S**2 / (a * a * S**2 + b2)
        return gain * x + (MU - gain * a * MU) * const

    return x0_fn


def observed_order(errors, ratio=2.0):
    return float(np.log(errors[0] / errors[1]) / np.log(ratio))


# --- agreement with the references -----------------------------------------------------------

REFERENCE_CASES = [
    ("dpm_solver++", {}, "2m"),
    ("dpm_solver++_sde", {}, "2m_sde"),
    ("dpm_solver++_3m", {}, "3m"),
    ("unipc", {"unipc_variant": "bh2"}, "bh2"),
    ("unipc", {"unipc_variant": "bh1"}, "bh1"),
]


@pytest.mark.parametrize("sampler,kw,kind", REFERENCE_CASES)
def test_multistep_matches_numpy_reference(x64, sampler, kw, kind):
    sched = dm.make_schedule("linear", 1000)
    abar = np.asarray(sched.alphas_cumprod)
    key = jax.random.key(3)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (8, 2)))
    ts = dm.respaced_timesteps(1000, 7, "trailing")
    out = dm.sample(
        lambda x, t, y: toy_eps(x, t, jnp),
        sched,
        key,
        x_T=x_T,
        sampler=sampler,
        num_steps=7,
        clip_denoised=False,
        **kw,
    )
    x0_fn = np_x0_from_eps(abar, lambda x, t: toy_eps(x, t, np))
    if sampler == "unipc":
        ref = ref_unipc(x0_fn, abar, ts, x_T, kind)
    else:
        ref = ref_dpm_solver_pp(x0_fn, abar, ts, x_T, kind, step_noise(key, 7, x_T.shape))
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "sampler,num_steps,churn",
    [
        ("euler", 6, None),
        ("heun", 11, None),
        # EDM's ImageNet-64 churn settings, on a few steps so that S_churn / K is large.
        ("heun", 7, (40.0, 0.05, 50.0, 1.003)),
        ("euler", 6, (40.0, 0.05, 50.0, 1.003)),
        # A lower top of the grid (sampling.sigma_max), for few steps on small images.
        ("heun", 9, {"sigma_max": 10.0}),
        ("euler", 5, {"sigma_max": 3.0}),
    ],
)
def test_karras_matches_numpy_reference(x64, sampler, num_steps, churn):
    top = PROJECT_SIGMA_MAX
    if isinstance(churn, dict):
        top, churn = churn["sigma_max"], None
    sched = dm.make_schedule("linear", 1000)
    abar = np.asarray(sched.alphas_cumprod)
    key = jax.random.key(5)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (8, 2)))
    kw = (
        {}
        if churn is None
        else dict(zip(("s_churn", "s_tmin", "s_tmax", "s_noise"), churn, strict=True))
    )
    out = dm.sample(
        lambda x, t, y: toy_eps(x, t, jnp),
        sched,
        key,
        x_T=x_T,
        sampler=sampler,
        num_steps=num_steps,
        clip_denoised=False,
        sigma_max=None if top == PROJECT_SIGMA_MAX else top,
        **kw,
    )
    steps = num_steps if sampler == "euler" else (num_steps + 1) // 2
    ts = ref_karras_timesteps(abar, steps, sigma_max=top)
    assert np.sqrt((1 - abar[ts[0]]) / abar[ts[0]]) <= top * 1.05  # the grid starts at the top
    x0_fn = np_x0_from_eps(abar, lambda x, t: toy_eps(x, t, np))
    ref = ref_edm(
        x0_fn,
        abar,
        ts,
        x_T,
        heun=sampler == "heun",
        churn=churn or (0.0, 0.0, np.inf, 1.0),
        noise=step_noise(key, steps, x_T.shape),
    )
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)
    if churn is not None:  # the churn did act: the deterministic sampler lands elsewhere
        plain = ref_edm(x0_fn, abar, ts, x_T, heun=sampler == "heun")
        assert np.abs(plain - ref).max() > 1e-2


def test_karras_samplers_on_explicit_timesteps(x64):
    """`timesteps=` replaces the Karras grid: K steps over those sigmas, then sigma = 0."""
    sched = dm.make_schedule("cosine", 1000)
    abar = np.asarray(sched.alphas_cumprod)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (8, 2)))
    ts = np.array([999, 700, 300, 80, 10])
    x0_fn = np_x0_from_eps(abar, lambda x, t: toy_eps(x, t, np))
    out = dm.sample(
        lambda x, t, y: toy_eps(x, t, jnp),
        sched,
        jax.random.key(1),
        x_T=x_T,
        sampler="heun",
        timesteps=ts,
        clip_denoised=False,
    )
    np.testing.assert_allclose(out, ref_edm(x0_fn, abar, ts, x_T, heun=True), rtol=1e-9, atol=1e-9)


def test_karras_timesteps():
    sched = dm.make_schedule("linear", 1000)
    abar = np.asarray(sched.alphas_cumprod)
    for num in (1, 2, 10, 80, 1000):
        ts = np.asarray(karras.karras_timesteps(sched.alphas_cumprod, num))
        np.testing.assert_array_equal(ts, ref_karras_timesteps(abar, num))
        assert ts[0] == 999 and len(ts) == num
        assert np.all(np.diff(ts) < 0) and ts[-1] >= 0
        if num > 1:
            assert ts[-1] == 0
    # 80 Karras sigmas are denser than the timesteps near sigma_min: the last ones are
    # consecutive timesteps rather than repeats.
    ts = np.asarray(karras.karras_timesteps(sched.alphas_cumprod, 80))
    np.testing.assert_array_equal(ts[-3:], [2, 1, 0])
    # With room to spare, the grid is the rounding of Karras' Eq. 5.
    table = np.sqrt((1 - abar) / abar)
    sigmas = np.asarray(karras.karras_sigmas(table[0], table[-1], 10))
    ts = np.asarray(karras.karras_timesteps(sched.alphas_cumprod, 10))
    assert np.all(np.abs(np.log(table[ts]) - np.log(sigmas)) < 0.2)


# --- Gaussian data ---------------------------------------------------------------------------


def exact_moments(abar, sampler, kw, num_steps):
    """The exact mean and std (2,) of a sampler's output from x_T ~ N(0, I) on Gaussian data:
    the NumPy reference run on affine samples (see the references)."""
    heun = sampler == "heun"
    steps = (num_steps + 1) // 2 if heun else num_steps
    basis = 2 + steps
    x_T = np.zeros((basis, 2))
    x_T[1] = 1.0
    noise = [np.eye(basis)[2 + i][:, None] * np.ones(2) for i in range(steps)]
    x0_fn = affine_gaussian_x0(abar, basis)
    if sampler in KARRAS:
        ts = ref_karras_timesteps(abar, steps, sigma_max=PROJECT_SIGMA_MAX)
        out = ref_edm(x0_fn, abar, ts, x_T, heun=heun)
    elif sampler == "unipc":
        ts = dm.respaced_timesteps(len(abar), steps, "trailing")
        out = ref_unipc(x0_fn, abar, ts, x_T, kw.get("unipc_variant", "bh2"))
    else:
        ts = dm.respaced_timesteps(len(abar), steps, "trailing")
        kind = {"dpm_solver++_sde": "2m_sde", "dpm_solver++_3m": "3m"}[sampler]
        out = ref_dpm_solver_pp(x0_fn, abar, ts, x_T, kind, noise)
    return out[0], np.sqrt((out[1:] ** 2).sum(0)), ts[-1]


@pytest.mark.parametrize(
    "sampler,kw,num_steps,std_tol",
    [
        # The std of the exact output distribution relative to the target at these budgets
        # (dimensions with s = 0.3, 0.8): SDE 1.007, 1.050 (its weak error: 1.045, 1.028 at 50
        # steps); 3M 1.015, 1.002; UniPC bh2 1.008, 1.014, bh1 1.030, 1.026; Euler 0.968,
        # 0.972; Heun 1.008, 1.006 (at 25 evaluations Heun is 1.16, 1.11 and Euler 0.87,
        # 0.89: the Karras grid from sigma_max = 80 needs more steps on this data).
        ("dpm_solver++_sde", {}, 25, 0.06),
        ("dpm_solver++_3m", {}, 25, 0.025),
        ("unipc", {}, 25, 0.025),
        ("unipc", {"unipc_variant": "bh1"}, 25, 0.04),
        ("euler", {}, 99, 0.04),
        ("heun", {}, 99, 0.015),
    ],
)
def test_gaussian_data_statistics(sampler, kw, num_steps, std_tol):
    """4096 samples from x_T ~ N(0, I), in float32, have the exact mean and std of the
    sampler's output law, which is near the data's."""
    sched = dm.make_schedule("linear", 1000)
    abar = np.asarray(sched.alphas_cumprod)
    x = dm.sample(
        gaussian_oracle(sched),
        sched,
        jax.random.key(0),
        shape=(4096, 2),
        sampler=sampler,
        num_steps=num_steps,
        clip_denoised=False,
        **kw,
    )
    x = np.asarray(x, np.float64)
    mean, std, t_last = exact_moments(abar, sampler, kw, num_steps)
    # Monte Carlo: standard errors std / 64 for the mean and 1.1% for the std.
    assert np.all(np.abs(x.mean(0) - mean) < 4.0 * std / np.sqrt(len(x))), (x.mean(0), mean)
    np.testing.assert_allclose(x.std(0), std, rtol=0.045)
    # The exact law against the target N(mu, s^4 / (s^2 + sigma_L^2)) (module doc); the mean
    # is off by about s mu / sigma_start, x_T ~ N(0, I) not being quite the marginal at the
    # first level: sigma_{T-1} = 157, or the Karras grid's top, PROJECT_SIGMA_MAX.
    sigma_start = PROJECT_SIGMA_MAX if sampler in KARRAS else np.sqrt((1 - abar[-1]) / abar[-1])
    np.testing.assert_allclose(mean, MU, atol=1.2 * np.max(np.abs(S * MU)) / sigma_start)
    np.testing.assert_allclose(std, target_std(abar, t_last), rtol=std_tol)


@pytest.mark.parametrize(
    "sampler,kw,num_steps,order",
    [
        ("dpm_solver++", {}, (32, 64), 2.0),
        # 3M is third order while its warm-up error (the first, Euler, step: local O(h^2))
        # is below the rest; past that (here from K = 48) the global order falls to 2, as
        # for diffusers' and k-diffusion's 3M, whose warm-up is the same.
        ("dpm_solver++_3m", {}, (16, 32), 3.0),
        # UniC lifts the order of UniP-2 to 3, the warm-up step included.
        ("unipc", {"unipc_variant": "bh2"}, (32, 64), 3.0),
        ("unipc", {"unipc_variant": "bh1"}, (32, 64), 3.0),
        ("euler", {}, (32, 64), 1.0),
        # Heun: K steps cost 2K - 1 evaluations.
        ("heun", {}, (63, 127), 2.0),
    ],
)
def test_order_of_convergence_on_the_exact_ode(x64, sampler, kw, num_steps, order):
    """Deterministic samplers on a fixed set of x_T against the exact ODE solution; the error
    at K and 2K steps gives the order."""
    sched = dm.make_schedule("linear", 1000)
    abar = np.asarray(sched.alphas_cumprod)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), (64, 2)))
    errors = []
    for n in num_steps:
        if sampler in KARRAS:
            steps = n if sampler == "euler" else (n + 1) // 2
            ts = np.asarray(
                karras.karras_timesteps(sched.alphas_cumprod, steps, sigma_max=PROJECT_SIGMA_MAX)
            )
            grid = {"num_steps": n}
        else:
            ts = lambda_uniform_timesteps(abar, n, lam_end=2.0)
            grid = {"timesteps": ts}
        assert dm.nfe(sampler, n) == n
        out = dm.sample(
            gaussian_oracle(sched),
            sched,
            jax.random.key(1),
            x_T=x_T,
            sampler=sampler,
            clip_denoised=False,
            **grid,
            **kw,
        )
        errors.append(np.abs(np.asarray(out) - exact_output(abar, x_T, ts[0], ts[-1])).max())
    measured = observed_order(errors)
    assert order - 0.15 < measured < order + 0.5, (errors, measured)


def test_sde_weak_convergence():
    """SDE-DPM-Solver++(2M): the exact mean and variance of its output, started from the
    true marginal at t = T - 1 (the NumPy reference, which the JAX sampler matches above, run
    on affine samples), against N(mu, s^4 / (s^2 + sigma_L^2))."""
    sched = dm.make_schedule("linear", 1000)
    abar = np.asarray(sched.alphas_cumprod)
    errors = []
    for num in (32, 64, 128):
        ts = lambda_uniform_timesteps(abar, num, lam_end=2.0)
        basis = 2 + num
        x_T = np.zeros((basis, 2))
        a, b2 = np.sqrt(abar[ts[0]]), 1.0 - abar[ts[0]]
        x_T[0], x_T[1] = a * MU, np.sqrt(a * a * S**2 + b2)
        noise = [np.eye(basis)[2 + i][:, None] * np.ones(2) for i in range(num)]
        out = ref_dpm_solver_pp(affine_gaussian_x0(abar, basis), abar, ts, x_T, "2m_sde", noise)
        # The mean stays exact (every update is unbiased for this data); the variance is
        # where the discretization shows.
        np.testing.assert_allclose(out[0], MU, atol=1e-12)
        errors.append(np.abs((out[1:] ** 2).sum(0) - target_std(abar, ts[-1]) ** 2).max())
    # Measured: 7.4e-3, 2.0e-3, 5.5e-4, orders 1.9 and 1.9 (1.6 from 128 to 256 steps).
    assert errors[-1] < 1e-3
    assert observed_order(errors[:2]) > 1.4 and observed_order(errors[1:]) > 1.4, errors


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_euler_is_the_same_for_every_parameterization(x64, prediction):
    sched = dm.make_schedule("cosine", 1000)
    x_T = jax.random.normal(jax.random.key(0), (16, 2))
    kw = dict(x_T=x_T, sampler="euler", num_steps=8, clip_denoised=False)
    ref = dm.sample(gaussian_oracle(sched, "eps"), sched, jax.random.key(1), **kw)
    out = dm.sample(
        gaussian_oracle(sched, prediction), sched, jax.random.key(1), prediction=prediction, **kw
    )
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)


# --- budget and interface --------------------------------------------------------------------


def test_nfe():
    for sampler in ("ddpm", "ddim", "dpm_solver++", "dpm_solver++_sde", "dpm_solver++_3m"):
        assert dm.nfe(sampler, 20) == 20
    assert dm.nfe("unipc", 10) == 10  # the corrector reuses the next step's evaluation
    assert dm.nfe("euler", 7) == 7
    assert [dm.nfe("heun", n) for n in (1, 2, 3, 4, 35, 36)] == [1, 1, 3, 3, 35, 35]
    with pytest.raises(ValueError, match="^sampler: unknown 'lms'"):
        dm.nfe("lms", 10)


@pytest.mark.parametrize(
    "sampler,num_steps",
    [
        ("heun", 9),
        ("heun", 2),
        ("unipc", 6),
        ("unipc", 1),
        ("euler", 1),
        ("dpm_solver++_3m", 2),
        ("dpm_solver++_sde", 3),
    ],
)
def test_evaluations_are_counted(sampler, num_steps):
    """The network runs nfe(sampler, num_steps) times (counted by a host callback), the
    shortest runs included."""
    sched = dm.make_schedule("linear", 1000)
    calls = []

    def model_fn(x, t, labels):
        jax.debug.callback(lambda _: calls.append(1), t)
        return gaussian_oracle(sched)(x, t, labels)

    x = dm.sample(
        model_fn, sched, jax.random.key(0), shape=(4, 2), sampler=sampler, num_steps=num_steps
    )
    assert np.all(np.isfinite(np.asarray(x)))
    assert len(calls) == dm.nfe(sampler, num_steps)


def test_heun_returns_the_x0_of_every_evaluation():
    sched = dm.make_schedule("linear", 1000)
    kw = dict(shape=(8, 2), sampler="heun", num_steps=9, clip_denoised=False)
    x, traj = dm.sample(
        gaussian_oracle(sched), sched, jax.random.key(0), return_x0_at=range(10), **kw
    )
    assert traj.shape == (10, 8, 2)
    # 9 evaluations; index 9 stands for the last, which is the output.
    np.testing.assert_array_equal(traj[8], traj[9])
    np.testing.assert_allclose(traj[-1], x, atol=1e-6)
    # Evaluations 1 and 2 are the corrector at sigma_1 and the next step's at sigma_1.
    assert not np.allclose(traj[1], traj[2])


@pytest.mark.parametrize(
    "sampler,option,message",
    [
        ("euler", {"spacing": "uniform"}, "^spacing: 'uniform' does not apply"),
        ("unipc", {"unipc_variant": "bh3"}, "^unipc_variant: unknown 'bh3'"),
        ("ddim", {"sigma_max": 10.0}, "^sigma_max: is the top of a Karras grid"),
        ("heun", {"sigma_max": 0.0}, "^sigma_max: must be > 0"),
    ],
)
def test_argument_errors(sampler, option, message):
    sched = dm.make_schedule("linear", 50)
    with pytest.raises(ValueError, match=message):
        dm.sample(
            gaussian_oracle(sched),
            sched,
            jax.random.key(0),
            sampler=sampler,
            shape=(1, 2),
            num_steps=4,
            **option,
        )
