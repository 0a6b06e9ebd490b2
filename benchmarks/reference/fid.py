"""FID-FMNIST: the Frechet distance between Gaussians fitted to FeatureNet features.

Same formula as FID (Heusel et al., 2017) but with features from a small Fashion-MNIST classifier
(``benchmarks.reference.features``) instead of Inception-v3, which is not available offline.
The values are only comparable with other FID-FMNIST values computed with the same shipped
network and reference statistics -- never with published Inception FIDs. Like FID, the estimate
is biased upwards for small sample counts, so compare runs at the same N.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from benchmarks.reference.features import DEFAULT_STATS, FeatureNet, features, load_feature_net

Stats = tuple[np.ndarray, np.ndarray]


def stats(feats: np.ndarray) -> Stats:
    """Mean and (unbiased, N-1) covariance of ``feats`` (N, D), both float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature matrix, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm_residual(root: np.ndarray, a: np.ndarray) -> float:
    # The relative error of root @ root vs a; scipy >= 1.16 no longer returns this itself.
    return float(np.linalg.norm(root @ root - a) / max(np.linalg.norm(a), 1e-300))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` for two Gaussians.

    ``eps`` is added to both diagonals only if the plain product is too singular for ``sqrtm``
    to give a usable root (e.g. dead ReLU units give all-zero covariance rows).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched shapes: {mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")

    diff = mu1 - mu2
    product = sigma1 @ sigma2
    with warnings.catch_warnings():
        # scipy warns about (near-)singular input; that case is detected and handled just below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(product)
        if not np.isfinite(covmean).all() or _sqrtm_residual(covmean, product) > 1e-3:
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))

    # S1 S2 is similar to a PSD matrix, so its root is real in exact arithmetic; rounding can leave
    # a tiny imaginary part (or tiny negative eigenvalues) that is safe to drop -- a large one
    # means the inputs are not valid covariances.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part: {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    if not np.isfinite(covmean).all():
        raise ValueError("matrix square root is not finite even with the eps offset")

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


@functools.lru_cache(maxsize=4)
def _load_stats(path: str) -> Stats:
    with np.load(path) as f:
        return f["mu"], f["sigma"]


@functools.lru_cache(maxsize=1)
def _default_net() -> FeatureNet:
    return load_feature_net()


def reference_stats(path: str | Path = DEFAULT_STATS) -> Stats:
    """The shipped Fashion-MNIST test-set statistics (mu (128,), sigma (128, 128))."""
    return _load_stats(str(path))


def fid_fmnist(
    images: torch.Tensor,
    net: FeatureNet | None = None,
    ref: Stats | str | Path | None = None,
) -> float:
    """FID-FMNIST of ``images`` ((N, 1, 32, 32) in [-1, 1]) against the reference statistics.

    ``net`` defaults to the shipped FeatureNet, ``ref`` to the shipped test-set statistics; pass
    ``ref`` as a ``(mu, sigma)`` pair or an ``.npz`` path to compare against something else.
    """
    net = _default_net() if net is None else net
    if ref is None or isinstance(ref, (str, Path)):
        mu_ref, sigma_ref = reference_stats(DEFAULT_STATS if ref is None else ref)
    else:
        mu_ref, sigma_ref = ref
    mu, sigma = stats(features(net, images.detach().cpu()))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def fid_with_interval(
    images: torch.Tensor, reps: int = 30, level: float = 0.9, seed: int = 0, net: FeatureNet | None = None
) -> tuple[float, float, float]:
    """FID-FMNIST of ``images`` and a bootstrap ``level`` interval (resampling the images, features once).

    The interval is the percentile interval of the FID of ``reps`` resamples with replacement; a
    resample repeats images, which lowers its covariance rank, so the interval sits somewhat above the
    point value at small N. Two rows rank reliably when their intervals do not overlap.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    net = _default_net() if net is None else net
    mu_ref, sigma_ref = reference_stats()
    feats = features(net, images.detach().cpu())
    point = frechet_distance(*stats(feats), mu_ref, sigma_ref)
    rng = np.random.default_rng(seed)
    boot = [
        frechet_distance(*stats(feats[rng.integers(0, len(feats), len(feats))]), mu_ref, sigma_ref) for _ in range(reps)
    ]
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return point, float(lo), float(hi)


@functools.lru_cache(maxsize=8)
def real_fid(n: int, subsets: int = 3, seed: int = 0) -> dict[str, float]:
    """FID-FMNIST of ``subsets`` random sets of ``n`` real *training* images against the test statistics:
    the floor a perfect generator reaches at the same N (FID is biased upwards at small N)."""
    from benchmarks.reference import data

    images, _ = data.load("train")
    if not 2 <= n <= len(images):
        raise ValueError(f"n must be in [2, {len(images)}], got {n}")
    values = []
    for k in range(subsets):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + k))[:n]
        values.append(fid_fmnist(images[idx]))
    return {"n": n, "mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
