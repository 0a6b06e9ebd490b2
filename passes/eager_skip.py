"""Eager lowering: the skip decision and the forecast weights on the host.

Traced, a cached block decides in-graph (``CachedBlock._decide``: a dozen 0-dim tensor ops for the gap,
the table row and the conformal error model). In eager every one of those is an operator dispatch of
several microseconds, and the branch reads the decision on the host anyway, so at small batches they cost
more than the arithmetic of a skipped block (issue 11, item 8). Here the same quantities are Python
floats: one read of δ² and of the steps, then plain arithmetic, and the forecast's weights come from a
host copy of the block's table row and enter ``add`` as scalars. The formulas are ``_decide``'s and
``forecast``'s; ``tests/test_eager_skip.py`` checks that both paths decide and predict alike.
"""

from __future__ import annotations

import itertools
import math

import torch

from fastcache_compile import conformal


class HostTables:
    """Host copies of one block's weight table and error-model coefficients, refreshed if a buffer is
    replaced (``module.to(...)`` makes new buffer tensors)."""

    def __init__(self) -> None:
        self._src: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.rows: list[list[float]] = []
        self.coef: list[float] = []

    def update(self, table: torch.Tensor | None, coef: torch.Tensor | None) -> HostTables:
        if self._src[0] is not table or self._src[1] is not coef:
            self.rows = [] if table is None else table.detach().float().cpu().tolist()
            self.coef = [] if coef is None else coef.detach().float().cpu().tolist()
            self._src = (table, coef)
        return self


def pattern_row(t: float, steps: list[float], max_gap: int) -> int:
    """``forecast.pattern_index`` of the gaps ``(t − s_1, s_1 − s_2, …)``, on the host."""
    row, radix = 0, 1
    for a, b in itertools.pairwise([t, *steps]):
        g = int(min(max(a - b, 1.0), float(max_gap)))  # clamp to [1, G], then truncate as ``.long()`` does
        row += (g - 1) * radix
        radix *= max_gap
    return row


def predicted_error(coef: list[float], delta2: float, gap: float, t: float) -> float:
    """``conformal.predict_error(coef, error_features(δ², gap, t))`` on the host."""
    d = delta2 if math.isfinite(delta2) else 0.0
    phi = (1.0, math.log(max(d, conformal._TINY)), math.log(max(gap, 1.0)), t)
    z = sum(c * f for c, f in zip(coef, phi))
    return math.exp(z) if z < 709.0 else math.inf  # exp overflows a double past ~709


def weighted_sum(x: torch.Tensor, residuals: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``x + Σ_k w_k r̂_k`` with scalar weights: one new tensor, then in-place accumulation."""
    out = torch.add(x, residuals[0], alpha=weights[0])
    for r, w in zip(residuals[1:], weights[1:]):
        out.add_(r, alpha=w)
    return out
