"""Power-function EMAs and their post-hoc reconstruction (EDM2): the math against float64
NumPy quadrature and a synthetic trajectory, the snapshots of a training run across a
resume, and --mode=posthoc_ema feeding eval, sample and export."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from test_configs import load_config

from diffusion_jax import checkpointing, export, preflight
from diffusion_jax import diffusion as dm
from diffusion_jax.errors import ConfigError
from diffusion_jax.evaluation import evaluate
from diffusion_jax.jobs import sample
from diffusion_jax.jobs import train as train_job
from diffusion_jax.jobs.posthoc_ema import posthoc_ema
from diffusion_jax.run import run_keys, setup_run
from diffusion_jax.training.state import ema_update
from diffusion_jax.weights import posthoc_path


def test_sigma_rel_and_exponent_match_edm2s_values():
    # EDM2 (section 3.1) pairs sigma_rel 0.05 with gamma 16.97 and 0.10 with gamma 6.94.
    np.testing.assert_allclose(dm.sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=5e-3)
    widths = np.array([0.01, 0.05, 0.07, 0.1, 0.2, 0.28])
    np.testing.assert_allclose(dm.gamma_to_sigma_rel(dm.sigma_rel_to_gamma(widths)), widths)
    # sigma_rel is the profile's standard deviation over t, by quadrature of eq. 121.
    for width in (0.05, 0.15):
        gamma = float(dm.sigma_rel_to_gamma(width))
        mean = integrate.quad(lambda tau, g=gamma: tau * (g + 1) * tau**g, 0, 1)[0]
        var = integrate.quad(lambda tau, g=gamma, m=mean: (tau - m) ** 2 * (g + 1) * tau**g, 0, 1)[
            0
        ]
        np.testing.assert_allclose(np.sqrt(var), width, rtol=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        dm.sigma_rel_to_gamma(0.3)


def _profile(t, gamma):
    return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1) if tau <= t else 0.0


def test_inner_products_equal_quadrature():
    for t_a, g_a, t_b, g_b in [(100, 6.9, 100, 16.9), (40, 6.9, 100, 16.9), (100, 3.0, 30, 1.5)]:
        pa, pb = _profile(t_a, g_a), _profile(t_b, g_b)
        expected = integrate.quad(
            lambda x, pa=pa, pb=pb: pa(x) * pb(x), 0, min(t_a, t_b), epsabs=0
        )[0]
        got = dm.profile_inner_products(t_a, g_a, t_b, g_b)
        np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_weights_equal_a_least_squares_solve_by_quadrature():
    ts = np.array([250.0, 500, 750, 1000] * 2)
    gammas = np.repeat(dm.sigma_rel_to_gamma([0.05, 0.10]), 4)
    target = (1000.0, float(dm.sigma_rel_to_gamma(0.07)))
    profiles = [_profile(t, g) for t, g in zip(ts, gammas, strict=True)]

    def dot(p, q, upto):
        return integrate.quad(lambda x: p(x) * q(x), 0, upto, limit=200, epsabs=0)[0]

    gram = np.array(
        [
            [dot(p, q, min(a, b)) for q, b in zip(profiles, ts, strict=True)]
            for p, a in zip(profiles, ts, strict=True)
        ]
    )
    rhs = np.array(
        [dot(p, _profile(*target), min(a, target[0])) for p, a in zip(profiles, ts, strict=True)]
    )
    expected = np.linalg.solve(gram, rhs)
    expected /= expected.sum()
    got = dm.posthoc_weights(ts, gammas, *target)[:, 0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_reconstruction_equals_a_directly_tracked_profile():
    """Snapshots of sigma_rel 0.05 and 0.10 every 100 of 2000 steps rebuild the 0.07 EMA
    tracked beside them (never used in the solve) within 1e-4, and the tracked 0.10 exactly.
    The trajectory is smooth drift plus noise, tracked with the train step's update."""
    rng = np.random.default_rng(0)
    steps, dims, every = 2000, 64, 100
    t = np.arange(1, steps + 1)
    freqs, phases = rng.uniform(0.5, 4, dims), rng.uniform(0, 2 * np.pi, dims)
    drift = np.sin(2 * np.pi * freqs * np.log1p(t[:, None]) / np.log(steps) + phases)
    trajectory = jnp.asarray(drift + 0.3 * rng.standard_normal((steps, dims)), jnp.float32)
    widths = (0.05, 0.10, 0.07)
    gammas = tuple(float(g) for g in dm.sigma_rel_to_gamma(widths))

    def update(emas, inputs):
        step, params = inputs
        emas = tuple(
            ema_update(e, params, dm.power_ema_beta(step, g))
            for e, g in zip(emas, gammas, strict=True)
        )
        return emas, emas

    zeros = tuple(jnp.zeros(dims) for _ in widths)
    _, history = jax.lax.scan(update, zeros, (jnp.arange(1, steps + 1), trajectory))
    history = [np.asarray(h, np.float64) for h in history]
    snap_t = np.arange(every, steps + 1, every)
    snapshots = np.concatenate([history[0][snap_t - 1], history[1][snap_t - 1]])
    weights = dm.posthoc_weights(
        np.tile(snap_t, 2), np.repeat(gammas[:2], len(snap_t)), steps, [gammas[2], gammas[1]]
    )
    rebuilt = weights.T @ snapshots

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(rebuilt[0], history[2][-1]) < 1e-4
    assert rel(rebuilt[1], history[1][-1]) < 1e-6
    # A width far from both is also rebuilt, less exactly: the test has teeth.
    assert rel(rebuilt[0], history[1][-1]) > 1e-2


SNAPSHOT_EVERY, CKPT_EVERY, NUM_STEPS = 2, 3, 6


def _config():
    config = load_config("digits.py", "smoke")
    config.training.num_steps = NUM_STEPS
    config.training.ckpt_every = CKPT_EVERY
    config.training.sample_every = 100
    config.training.log_every = 100
    config.training.ema_snapshot_every = SNAPSHOT_EVERY
    config.training.max_to_keep = 5
    config.optim.ema_sigma_rels = (0.05, 0.10)
    config.eval.num_samples = 8
    return config


def _snapshot_arrays(workdir):
    out = {}
    folder = checkpointing.checkpoint_dir(workdir, checkpointing.EMA_SNAPSHOTS)
    for step_dir in sorted(p for p in folder.iterdir() if p.name.isdigit()):
        manager = checkpointing.make_manager(
            workdir, read_only=True, folder=checkpointing.EMA_SNAPSHOTS
        )
        restored = manager.restore(int(step_dir.name))
        out[int(step_dir.name)] = (jax.tree.leaves(restored.state), restored.meta)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("phema")
    config = _config()
    state = train_job.train_and_evaluate(config, workdir)
    return config, workdir, state


def test_snapshots_are_the_tracked_profiles(trained):
    config, workdir, state = trained
    snaps = _snapshot_arrays(workdir)
    assert sorted(snaps) == [2, 4, 6]
    leaves, meta = snaps[6]
    assert meta["t"] == 6 and meta["sigma_rels"] == [0.05, 0.10]
    np.testing.assert_allclose(meta["gammas"], dm.sigma_rel_to_gamma([0.05, 0.10]))
    for got, expected in zip(leaves, jax.tree.leaves(state.power_emas), strict=True):
        np.testing.assert_array_equal(got, np.asarray(expected))
    # The profiles moved away from each other and from the exponential EMA.
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in state.power_emas)
    assert not np.allclose(a, b)


def test_a_killed_run_resumes_to_bit_identical_snapshots(trained, tmp_path):
    """A run killed after snapshot 6 but before checkpoint 6 was written: resuming from
    checkpoint 3 rewrites snapshots 4 and 6, bit for bit."""
    config, workdir, _ = trained
    killed = tmp_path / "killed"
    shutil.copytree(workdir, killed)
    shutil.rmtree(checkpointing.checkpoint_dir(killed) / "6")
    stale = checkpointing.checkpoint_dir(killed, checkpointing.EMA_SNAPSHOTS) / "6"
    assert stale.exists()
    train_job.train_and_evaluate(config, killed)
    expected, got = _snapshot_arrays(workdir), _snapshot_arrays(killed)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step][1] == expected[step][1]
        for a, b in zip(got[step][0], expected[step][0], strict=True):
            np.testing.assert_array_equal(a, b)


def test_posthoc_rebuilds_tracked_widths_and_feeds_eval_sample_export(trained):
    config, workdir, state = trained
    config = config.copy_and_resolve_references()
    config.eval.ema_sigma_rel = 0.10  # tracked: the rebuild must give it back
    (record,) = posthoc_ema(config, workdir)
    params, _ = export.load_params(posthoc_path(workdir, 0.10, NUM_STEPS))
    for got, expected in zip(
        jax.tree.leaves(params), jax.tree.leaves(state.power_emas[1]), strict=True
    ):
        np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-6)
    weights = json.loads(
        posthoc_path(workdir, 0.10, NUM_STEPS).with_suffix(".weights.json").read_text()
    )
    assert np.isclose(sum(weights["weights"]), 1.0) and len(weights["weights"]) == 6

    config.eval.ema_sigma_rel = 0.07  # not tracked: read from posthoc_ema/
    with pytest.raises(
        FileNotFoundError, match="--mode=posthoc_ema --config.eval.ema_sigma_rel=0.07"
    ):
        preflight.check(config, workdir, "eval")
    posthoc_ema(config, workdir)
    preflight.check(config, workdir, "eval")
    (result,) = evaluate.evaluate(config, workdir)
    assert result["step"] == NUM_STEPS and result["ema"] == "power sigma_rel=0.07 (posthoc)"
    assert sample.sample(config, workdir).exists()


def test_sweep_writes_the_curve(trained):
    config, workdir, _ = trained
    config = config.copy_and_resolve_references()
    config.eval.ema_sigma_rels = (0.06, 0.12)
    records = posthoc_ema(config, workdir)
    assert [r["sigma_rel"] for r in records] == [0.06, 0.12]
    curve = json.loads((workdir / "posthoc_ema" / f"curve_step_{NUM_STEPS}.json").read_text())
    assert [row["sigma_rel"] for row in curve] == [0.06, 0.12]
    assert all(row["digits_fd"] > 0 for row in curve)
    assert (workdir / "posthoc_ema" / f"curve_step_{NUM_STEPS}.png").stat().st_size > 1000


def test_posthoc_without_snapshots_is_one_line(tmp_path):
    config = _config()
    config.eval.ema_sigma_rel = 0.07
    with pytest.raises(ConfigError, match="no EMA snapshot"):
        preflight.check_posthoc(config, tmp_path)
    config.eval.ema_sigma_rel = 0.0
    with pytest.raises(ConfigError, match="config.eval.ema_sigma_rel"):
        preflight.check_posthoc(config, tmp_path)


def test_checkpoints_from_before_power_emas_restore(tmp_path):
    """A checkpoint without the power_emas field (older runs) restores when none is tracked,
    and asking for profiles it lacks is one line naming optim.ema_sigma_rels."""
    config = _config()
    config.optim.ema_sigma_rels = ()
    run = setup_run(config, run_keys(config)[0])
    state = run.init_state(run_keys(config)[0])
    old_layout = {k: v for k, v in vars(state).items() if k != "power_emas"}
    manager = checkpointing.make_manager(tmp_path, async_save=False)
    checkpointing.save(manager, 0, old_layout, {"step": 0})
    manager.wait_until_finished()
    restored, _ = checkpointing.restore(manager, 0, run.abstract_state)
    assert restored.power_emas == ()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tracking = _config()
    run = setup_run(tracking, run_keys(tracking)[0])
    with pytest.raises(ConfigError, match="config.optim.ema_sigma_rels: checkpoint 0 tracks 0"):
        checkpointing.restore(manager, 0, run.abstract_state)
