"""Sample-quality metrics on feature sets: Frechet distance, Inception Score, precision/recall,
and reference statistics files."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of features (N, D), in float64; sigma with N - 1 (as np.cov)."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), in float64.

    scipy's sqrtm of S1 S2; when that product is singular (fewer samples than dimensions)
    eps is added to both diagonals, and an imaginary part above 1e-3 is an error, as
    pytorch-fid does.
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(
            f"statistics shapes differ: mu {mu1.shape} vs {mu2.shape}, "
            f"sigma {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `num_splits` splits: (mean, std) (Salimans et al.)."""
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for part in np.array_split(p, num_splits):
        py = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(py + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :], 0.0)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    precision: fraction of fake features inside some real feature's k-NN ball;
    recall: fraction of real features inside some fake feature's k-NN ball.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def radii(x):
        d = _pairwise_sq_dists(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def coverage(points, manifold):
        r = radii(manifold)
        return float((_pairwise_sq_dists(points, manifold) <= r[None, :]).any(axis=1).mean())

    return coverage(fake, real), coverage(real, fake)


def load_stats(path) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of a reference statistics file: an .npz with mu/sigma (pytorch-fid's
    --save-stats), or guided-diffusion's reference batch (.npz with arr_0 images and mu,
    sigma)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"reference statistics file {path} does not exist (set eval.reference_stats)"
        )
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(
                f"{path}: an .npz with arrays 'mu' and 'sigma' is expected, "
                f"found {sorted(f.keys())}"
            )
        return {"mu": f["mu"].astype(np.float64), "sigma": f["sigma"].astype(np.float64)}


def save_stats(path, mu, sigma, features=None) -> None:
    """mu, sigma (and optionally the features, for precision/recall) as an .npz."""
    extra = {} if features is None else {"features": np.asarray(features, np.float32)}
    np.savez(path, mu=mu, sigma=sigma, **extra)


def reference_features(path, inception_params, mesh=None, max_count: int = 10_000):
    """Real features for precision/recall: the `features` array of our statistics files, or
    the Inception features of guided-diffusion's reference images (`arr_0`, uint8 NHWC)."""
    with np.load(path) as f:
        if "features" in f:
            return f["features"][:max_count]
        if "arr_0" in f:
            from diffusion_jax.evaluation import inception

            return inception.fid_features(inception_params, f["arr_0"][:max_count], mesh=mesh)
    raise ValueError(
        f"{path}: precision/recall need reference 'features' or images 'arr_0'; "
        "recompute it with `python -m diffusion_jax.tools.reference_stats`"
    )


def file_hash(path) -> str:
    """sha256 of a file (first 16 hex digits), to record which file produced a number."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
