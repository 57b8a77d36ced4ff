"""Frechet distance, Inception Score, precision/recall and the digits feature network."""

import numpy as np
import pytest
from scipy import ndimage

from diffusion_jax.data import digits
from diffusion_jax.evaluation import digits_classifier, metrics


def reference_fd(mu1, s1, mu2, s2):
    """tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), with S1^1/2 from eigh: no sqrtm."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(
        ((mu1 - mu2) ** 2).sum()
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


def random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


@pytest.mark.parametrize("rank", [None, 5])
def test_frechet_distance_against_eigendecomposition(rank):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1 = random_cov(rng, d, rank) + (1e-9 * np.eye(d) if rank else 0)  # nearly singular
    s2 = random_cov(rng, d)
    np.testing.assert_allclose(
        metrics.frechet_distance(mu1, s1, mu2, s2), reference_fd(mu1, s1, mu2, s2), rtol=1e-6
    )


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    np.testing.assert_allclose(
        metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), expected, rtol=1e-10
    )


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(2).normal(size=(500, 32))
    stats = metrics.statistics(feats)
    assert abs(metrics.frechet_distance(*stats, *stats)) < 1e-8


def test_inception_score_limits():
    assert metrics.inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)
    confident = np.full((1000, 10), -1e4)
    confident[np.arange(1000), np.arange(1000) % 10] = 0.0
    assert metrics.inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)


def test_precision_recall_of_a_set_with_itself_is_one():
    feats = np.random.default_rng(3).normal(size=(200, 8))
    assert metrics.precision_recall(feats, feats) == (1.0, 1.0)
    far = feats + 100.0
    assert metrics.precision_recall(feats, far) == (0.0, 0.0)


def test_stats_files(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    metrics.save_stats(tmp_path / "ref.npz", mu, sigma)
    stats = metrics.load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(stats["mu"], mu)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        metrics.load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="eval.reference_stats"):
        metrics.load_stats(tmp_path / "missing.npz")


def test_digits_fd_orders_real_blurred_and_noise():
    """Reference: the held-out split. Real training digits score far below blurred ones,
    which score far below noise (figures when written: 8.2, 170 and 777)."""
    params = digits_classifier.load_params()
    test_x, test_y = digits.load_digits("test", 16)
    train_x, _ = digits.load_digits("train", 16)
    ref = metrics.statistics(digits_classifier.features_and_logits(params, test_x)[0])

    def fd(images):
        return metrics.frechet_distance(
            *metrics.statistics(digits_classifier.features_and_logits(params, images)[0]), *ref
        )

    real = fd(train_x[:600])
    blurred = fd(ndimage.gaussian_filter(train_x[:600], sigma=(0, 1.5, 1.5, 0)))
    noise = fd(np.random.default_rng(0).uniform(-1, 1, (600, 16, 16, 1)).astype(np.float32))
    assert real < 0.2 * blurred and blurred < noise
    _, logits = digits_classifier.features_and_logits(params, test_x)
    assert (logits.argmax(1) == test_y).mean() > 0.95
