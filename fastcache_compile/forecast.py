"""Fitted multi-step residual forecaster (issue 11): plain tensor math, traced into the skip branch.

A skipped block's output is predicted from its last ``K`` computed residuals ``r̂_1 … r̂_K`` (``r̂_1``
the newest, computed at steps ``s_1 > s_2 > … > s_K``; now at step ``t``)::

    ŷ = x + Σ_{k=1..K} w_k · r̂_k

The weights depend on the *gap pattern* ``g = (t − s_1, s_1 − s_2, …, s_{K−1} − s_K)``: one row of a
``(G^K, K)`` table per pattern, each gap clamped to ``G = max_gap``. The rows are fitted by least squares
on full calibration runs (as L2P fits weights per pair of steps), a row whose pattern was seen fewer
than ``min_count`` times falls back to the block's pooled fit over all patterns.

Fixed weights are a special case: ``lagrange_table`` holds the weights that extrapolate the
polynomial of degree ``K − 1`` through the ``K`` computed residuals (TaylorSeer's finite differences
of order ``K − 1`` with the true step spacing; ``K = 1`` is plain reuse, ``K = 2`` the trajectory
form with β = 1).

The fit works on residual inner products only: per calibration sequence ``M[a, b] = ⟨r_a, r_b⟩``
over its steps, so every pattern's normal equations ``M[s, s] w = M[s, t]`` are look-ups.
"""

from __future__ import annotations

import itertools

import torch

MAX_GAP_LIMIT = 16  # 16**3 = 4096 table rows per block at K = 3


def num_patterns(order: int, max_gap: int) -> int:
    _check(order, max_gap)
    return max_gap**order


def pattern_index(gaps: torch.Tensor, max_gap: int) -> torch.Tensor:
    """Row of the weight table for gap pattern(s) ``gaps`` (..., K) of integer-valued floats or ints.

    Gaps are clamped to ``[1, max_gap]``: the last bucket holds every gap ≥ ``max_gap``.
    """
    g = gaps.clamp(1, max_gap).long() - 1  # (..., K) in [0, G)
    radix = max_gap ** torch.arange(g.shape[-1], device=g.device)  # (K,)
    return (g * radix).sum(-1)


def patterns(order: int, max_gap: int) -> list[tuple[int, ...]]:
    """All gap patterns in table-row order (``pattern_index`` of entry i is i)."""
    _check(order, max_gap)
    # pattern_index puts the first gap in the lowest digit, so iterate the last gap slowest
    return [tuple(reversed(p)) for p in itertools.product(range(1, max_gap + 1), repeat=order)]


def lagrange_weights(gaps: tuple[int, ...]) -> list[float]:
    """Weights extrapolating the degree-(K−1) polynomial through r̂_1..r̂_K to step t.

    ``w_k = Π_{j≠k} (t − s_j) / (s_k − s_j)`` with ``s_k = t − (g_1 + … + g_k)``.
    """
    steps = list(itertools.accumulate(gaps))  # t − s_k
    out = []
    for k, dk in enumerate(steps):
        w = 1.0
        for j, dj in enumerate(steps):
            if j != k:
                w *= dj / (dj - dk)  # (t − s_j) / (s_k − s_j) with s = t − d
        out.append(w)
    return out


def lagrange_table(order: int, max_gap: int) -> torch.Tensor:
    """(G^K, K) fixed polynomial-extrapolation weights, the TaylorSeer-like special case."""
    return torch.tensor([lagrange_weights(p) for p in patterns(order, max_gap)], dtype=torch.float32)


def select_weights(table: torch.Tensor, t: torch.Tensor, steps: list[torch.Tensor], max_gap: int) -> torch.Tensor:
    """(K,) weights for the current step ``t`` and computed steps ``steps = [s_1, …, s_K]`` (0-dim)."""
    s = torch.stack([t.float(), *[x.float() for x in steps]])  # (K + 1,)
    gaps = s[:-1] - s[1:]  # (K,)
    # index_select, not table[i]: a 0-dim tensor index is data-dependent for torch.export (ONNX Gather)
    return table.index_select(0, pattern_index(gaps, max_gap).reshape(1))[0]


def forecast(x: torch.Tensor, residuals: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """ŷ = x + Σ_k w_k r̂_k; ``weights`` (K,) from ``select_weights``."""
    w = weights.to(x.dtype)
    # One new tensor, then in-place accumulation: in eager each fresh activation-sized tensor costs
    # an allocation that page-faults, which made the out-of-place sum ~9x slower than the arithmetic
    # on the CPU (a skipped block's predictor then cost a third of the block). Traced, it is the same.
    out = torch.addcmul(x, w[0], residuals[0])
    for k in range(1, len(residuals)):
        out.addcmul_(w[k], residuals[k])
    return out


def examples(num_steps: int, order: int, max_gap: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every forecast a ``num_steps`` sequence offers with all gaps in ``[1, max_gap]``.

    Returns ``t`` (E,), the computed steps ``s`` (E, K) with ``s[:, 0] = s_1`` and the table rows (E,).
    """
    pats = torch.tensor(patterns(order, max_gap))  # (P, K)
    back = pats.cumsum(1)  # (P, K): t − s_k
    t = torch.arange(num_steps).repeat_interleave(len(pats))  # (T·P,)
    s = t[:, None] - back.repeat(num_steps, 1)  # (T·P, K)
    rows = torch.arange(len(pats)).repeat(num_steps)
    keep = s[:, -1] >= 0
    return t[keep], s[keep], rows[keep]


def fit_table(
    grams: list[torch.Tensor],
    order: int,
    max_gap: int,
    *,
    ridge: float = 1e-6,
    min_count: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares weight table of one block from residual inner products.

    ``grams``: per calibration sequence a (T, T) matrix ``⟨r_a, r_b⟩`` over its steps (summed over the
    block's paired outputs, which then share weights). Minimises ``Σ ‖Σ_k w_k r_{s_k} − r_t‖²`` per
    pattern; ``ridge`` (relative to the mean diagonal of the pattern's Gram matrix) shrinks a row towards
    the pooled fit, which itself shrinks towards plain reuse ``(1, 0, …)``. Returns the (G^K, K) table
    (float32) and the (G^K,) number of examples per pattern.
    """
    _check(order, max_gap)
    if ridge < 0 or min_count < 1:
        raise ValueError(f"ridge must be >= 0 and min_count >= 1, got ridge={ridge!r}, min_count={min_count!r}")
    n_pat = max_gap**order
    lhs = torch.zeros(n_pat, order, order, dtype=torch.float64)
    rhs = torch.zeros(n_pat, order, dtype=torch.float64)
    counts = torch.zeros(n_pat, dtype=torch.int64)
    for m in grams:
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"each gram must be a square (T, T) matrix of residual inner products, got {m.shape}")
        m = m.double()
        t, s, rows = examples(m.shape[0], order, max_gap)
        lhs.index_add_(0, rows, m[s[:, :, None], s[:, None, :]])  # (E, K, K) Gram of the history
        rhs.index_add_(0, rows, m[s, t[:, None]])  # (E, K) history against the target
        counts += torch.bincount(rows, minlength=n_pat)
    prior = torch.zeros(order, dtype=torch.float64)
    prior[0] = 1.0  # plain reuse
    pooled = _solve(lhs.sum(0), rhs.sum(0), ridge, prior)
    table = pooled.expand(n_pat, order).clone()
    for i in range(n_pat):
        if counts[i] >= min_count:
            table[i] = _solve(lhs[i], rhs[i], ridge, pooled)
    return table.float(), counts


def squared_errors(gram: torch.Tensor, t: torch.Tensor, s: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(E,) ``‖Σ_k w_k r_{s_k} − r_t‖²`` of forecasts ``t`` (E,), ``s`` (E, K), ``weights`` (E, K),
    from one sequence's residual inner products."""
    m = gram.double()
    w = weights.double()
    quad = torch.einsum("ek,ekj,ej->e", w, m[s[:, :, None], s[:, None, :]], w)
    return quad - 2 * (w * m[s, t[:, None]]).sum(1) + m[t, t]


def _solve(a: torch.Tensor, b: torch.Tensor, ridge: float, prior: torch.Tensor) -> torch.Tensor:
    # argmin ‖F w − y‖² + μ ‖w − prior‖²  ⇔  (A + μ I) w = b + μ prior
    k = a.shape[0]
    mu = ridge * float(torch.diagonal(a).mean()) if k else 0.0
    eye = torch.eye(k, dtype=a.dtype)
    # lstsq: collinear histories (a constant stream) give a singular A; the minimum-norm solution is fine
    return torch.linalg.lstsq(a + mu * eye, (b + mu * prior).unsqueeze(-1)).solution.squeeze(-1)


def _check(order: int, max_gap: int) -> None:
    if not isinstance(order, int) or not 1 <= order <= 4:
        raise ValueError(f"forecast order K must be an int in 1..4, got {order!r}")
    if not isinstance(max_gap, int) or not 1 <= max_gap <= MAX_GAP_LIMIT:
        raise ValueError(
            f"max_gap must be an int in 1..{MAX_GAP_LIMIT} (the weight table has max_gap**K rows), got {max_gap!r}"
        )
