"""The FastCache skip test (DESIGN.md, "Decision rule"), as plain tensor functions.

Under the null hypothesis "block input moved only by noise of relative RMS τ", the K = N·D (times
batch) scaled element changes are standard normal, so K·δ²/τ² ~ χ²(K). A block is skipped iff

    δ² = ‖x − x̂‖² / ‖x̂‖²  ≤  τ² · χ²_{K, 1−α} / K.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch


def chi2_quantile_ratio(dof: int, alpha: float) -> float:
    """χ²_{dof, 1−α} / dof, exactly (scipy)."""
    from scipy.stats import chi2

    return float(chi2.ppf(1.0 - alpha, dof)) / dof


def chi2_quantile_ratio_wh(dof: int, alpha: float) -> float:
    """Wilson–Hilferty approximation of χ²_{dof, 1−α} / dof (no scipy; used for symbolic sizes)."""
    z = NormalDist().inv_cdf(1.0 - alpha)
    c = 2.0 / (9.0 * dof)
    return (1.0 - c + z * math.sqrt(c)) ** 3


def skip_threshold(tau: float, alpha: float, dof: int) -> float:
    """The bound δ² is compared with; negative (never skip) when τ = 0."""
    if tau <= 0.0:
        return -1.0
    return tau * tau * chi2_quantile_ratio(dof, alpha)


def relative_change(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
    """δ² over all hidden streams of a block together, in float32: a 0-dim tensor."""
    return sum(squared_change(x, r) for x, r in zip(xs, refs)) / sum(squared_norm(r) for r in refs)


# Every block runs these on every call: for float32 streams one activation-sized temporary (the
# difference, squared in place) instead of three. In eager each fresh temporary of that size costs an allocation that
# page-faults on the CPU, which is most of what the statistic cost.
def squared_change(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """‖x − ref‖² in float32 (0-dim)."""
    return (x.float() - ref.float()).pow_(2).sum()


def squared_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖² in float32 (0-dim), without a temporary."""
    return torch.linalg.vector_norm(x, dtype=torch.float32).square()


def should_compute(delta2: torch.Tensor, threshold: float, force: torch.Tensor) -> torch.Tensor:
    """True where the block must run: forced, input moved significantly, or δ² is not finite.

    ``~(δ² <= thr)`` is True for NaN, so a non-finite statistic always computes.
    """
    return force | ~(delta2 <= threshold)
