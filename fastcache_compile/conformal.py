"""Split-conformal skip thresholds (issue 11, "Certified"): plain tensor math.

A skipped block's relative output error ``e = ‖ŷ − y‖ / ‖y‖`` is predicted from cheap statistics by a
fitted per-block model ``ê = exp(c · φ)``, ``φ = (1, log δ², log(t − s), t)`` (``error_features``). The
block is skipped iff ``ê ≤ cutoff``, with the cutoff set on held-out calibration pairs ``(ê_i, e_i)``
by the finite-sample rank rule: among the ``n_c`` calibration points the cutoff would skip, the
``⌈(n_c + 1)(1 − α)⌉``-th smallest error must be ≤ τ. For a fresh point exchangeable with them that
bounds ``P(e > τ | skipped) ≤ α`` (split conformal: the ``k``-th order statistic of ``n`` exchangeable
scores exceeds a fresh one with probability ≥ ``k / (n + 1)``).

Caveats, stated rather than hidden: the cutoff is the largest one that passes, chosen on the same
points it is checked on (a mild optimism, measured by the audit), and the calibration pairs come from
full computations, whereas at inference a block's history and input carry the errors of earlier skips.
"""

from __future__ import annotations

import math

import torch

NUM_FEATURES = 4  # (1, log δ², log gap, step)
_TINY = 1e-12


def rank(n: int, alpha: float) -> int:
    """``⌈(n + 1)(1 − α)⌉``: which order statistic of ``n`` scores is the conformal quantile (> n: none)."""
    _check_alpha(alpha)
    # round away float noise before the ceiling: (19 + 1)(1 − 0.05) must be 19, not 20
    return math.ceil(round((n + 1) * (1.0 - alpha), 9))


def quantile(scores: torch.Tensor, alpha: float) -> float:
    """The conformal quantile q: ``P(S_new ≤ q) ≥ 1 − α`` for a fresh exchangeable score; inf if n is too small."""
    s = scores.detach().double().reshape(-1)
    k = rank(s.numel(), alpha)
    if k > s.numel():
        return math.inf
    return float(torch.sort(s).values[k - 1])


def skip_cutoff(pred: torch.Tensor, err: torch.Tensor, tau: float, alpha: float) -> float:
    """Largest predictor cutoff ``c`` (skip iff ``pred ≤ c``) whose skipped calibration errors pass the rank rule.

    ``pred``/``err`` (n,): predicted and true relative errors of held-out forecasts. Returns ``-inf``
    (never skip) when no cutoff passes, e.g. ``τ = 0`` or fewer than ``(1 − α)/α`` calibration points.
    """
    if pred.shape != err.shape or pred.ndim != 1:
        raise ValueError(f"pred and err must be 1-D of one length, got {tuple(pred.shape)} and {tuple(err.shape)}")
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    _check_alpha(alpha)
    if tau <= 0 or pred.numel() == 0:
        return -math.inf
    p, passes = _prefix_passes(pred, err, tau, alpha)
    idx = torch.nonzero(passes).reshape(-1)
    return float(p[idx[-1]]) if idx.numel() else -math.inf


def _prefix_passes(
    pred: torch.Tensor, err: torch.Tensor, tau: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predictions sorted, and per candidate cutoff ``p[i]`` whether the errors it skips pass the rank rule."""
    p = pred.detach().double()
    order = torch.argsort(p)
    p, ok = p[order], (err.detach().double()[order] <= tau)
    n_ok = torch.cumsum(ok.long(), 0)  # (n,) non-violations among the first n_c
    n_c = torch.arange(1, p.numel() + 1)
    need = torch.tensor([rank(int(m), alpha) for m in n_c])
    # rank rule: the need-th smallest error of the prefix is ≤ τ  ⇔  at least `need` errors are ≤ τ;
    # a cutoff must not split tied predictions (they are skipped together)
    return p, (n_ok >= need) & (need <= n_c) & torch.cat([p[1:] > p[:-1], torch.tensor([True])])


def joint_cutoff(
    pred: torch.Tensor, err: torch.Tensor, dpred: torch.Tensor, derr: torch.Tensor, tau: float, alpha: float
) -> float:
    """Largest cutoff that passes the rank rule on the held-out pairs ``(pred, err)`` *and* on the pairs
    observed under caching ``(dpred, derr)`` (``calibrate(drift=...)``), and that does not exceed the
    largest prediction observed under caching (its pairs say nothing above it). ``-inf`` if none passes;
    an empty or too small drift set (a block that seldom skipped in the drift pass) never skips."""
    if tau <= 0 or pred.numel() == 0 or dpred.numel() == 0:
        return -math.inf
    _check_alpha(alpha)
    p, passes = _prefix_passes(pred, err, tau, alpha)
    dp = dpred.detach().double()
    d_order = torch.argsort(dp)
    dp, d_ok = dp[d_order], torch.cumsum((derr.detach().double()[d_order] <= tau).long(), 0)
    m = torch.searchsorted(dp, p, right=True)  # drift points the candidate cutoff would skip
    m_ok = torch.where(m > 0, d_ok[(m - 1).clamp_min(0)], torch.zeros_like(m))
    # as in skip_cutoff, a cutoff needs enough drift points below it: no evidence, no certificate
    m_need = torch.tensor([rank(int(v), alpha) if v > 0 else 1 for v in m])
    d_passes = (m_need <= m) & (m_ok >= m_need)
    idx = torch.nonzero(passes & d_passes & (p <= dp[-1])).reshape(-1)
    return float(p[idx[-1]]) if idx.numel() else -math.inf


def error_features(delta2: torch.Tensor, gap: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(..., 4) features of the error model: ``(1, log δ², log(t − s), t)``; traceable."""
    d = delta2.float()
    d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))  # non-finite δ² computes anyway
    one = torch.ones_like(d)
    return torch.stack([one, d.clamp_min(_TINY).log(), gap.float().clamp_min(1.0).log(), step.float() * one], -1)


def fit_error_model(features: torch.Tensor, err: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """(F,) coefficients of ``log e ≈ c · φ`` by ridge least squares (intercept unpenalised)."""
    if features.ndim != 2 or features.shape[0] != err.shape[0]:
        raise ValueError(f"features must be (n, F) with n = len(err), got {tuple(features.shape)} and {len(err)}")
    x = features.double()
    y = err.double().clamp_min(_TINY).log()
    pen = ridge * torch.eye(x.shape[1], dtype=x.dtype) * float((x**2).mean())
    pen[0, 0] = 0.0
    return torch.linalg.lstsq(x.T @ x + pen, (x.T @ y).unsqueeze(-1)).solution.squeeze(-1).float()


def predict_error(coef: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``ê = exp(c · φ)``; traceable (used in-graph for the skip decision)."""
    return torch.exp((features * coef.to(features.dtype)).sum(-1))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05; got {alpha!r}")
