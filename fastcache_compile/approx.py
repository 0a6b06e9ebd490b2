"""Skip-path predictors and their closed-form fits (DESIGN.md, "Learned linear approximation").

Notation: ``x`` is a block's input now, ``x_hat``/``r_hat`` its input and residual ``y − x`` the last
time it was computed (step ``s``), ``r_prev`` the residual computed before that (step ``s_prev``),
``t`` the current step. All functions are plain tensor code so they can be tested alone and traced
into the skip branch of the rewritten graph.
"""

from __future__ import annotations

import torch

FORMS = ("reuse", "trajectory", "linear", "direct")


def reuse(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """y ≈ x + r̂, i.e. ŷ + (x − x̂): the baseline every learned map must beat."""
    return x + r_hat


def trajectory(
    x: torch.Tensor,
    r_hat: torch.Tensor,
    r_prev: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    s_prev: torch.Tensor,
    beta: torch.Tensor,
) -> torch.Tensor:
    """y ≈ x + r̂ + β ⊙ (r̂ − r̂′)·(t − s)/(s − s′): fitted linear extrapolation of the residual."""
    gap = (t - s) / (s - s_prev).clamp_min(1.0)  # steps are integers; s > s' once two computes happened
    # one new tensor instead of four (fresh activation-sized tensors are what costs in eager)
    slope = (r_hat - r_prev).mul_(beta * gap.to(x.dtype))
    return slope.add_(x).add_(r_hat)


def linear(x: torch.Tensor, x_hat: torch.Tensor, r_hat: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """y ≈ ŷ + A(x − x̂), stored as ``a = A − I`` so the fit shrinks towards plain reuse."""
    dx = x - x_hat  # (B, N, D)
    return x + r_hat + dx @ a.to(x.dtype).T


def direct(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y ≈ W x + b (the paper's form)."""
    return x @ w.to(x.dtype).T + b.to(x.dtype)


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float, bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression ``y ≈ x Wᵀ + b``; the bias is not penalised.

    x: (n, d), y: (n, e). Returns W (e, d) and b (e,) in float32; solved in float64 so an exactly
    linear map is recovered to ~1e-6.
    """
    x64, y64 = x.double(), y.double()
    if bias:
        x_mean, y_mean = x64.mean(0), y64.mean(0)
        x64, y64 = x64 - x_mean, y64 - y_mean  # centring = an unpenalised intercept
    gram = x64.T @ x64 + lam * torch.eye(x64.shape[1], dtype=torch.float64)  # (d, d)
    # A constant input (a text stream no step changes) gives x = 0 and lam = 0: solve in the
    # least-squares sense, which returns the minimum-norm map (0 for x = 0) instead of failing.
    w = torch.linalg.lstsq(gram, x64.T @ y64).solution.T  # (e, d)
    b = (y_mean - w @ x_mean) if bias else torch.zeros(w.shape[0], dtype=torch.float64)
    return w.float(), b.float()


def fit_beta(directions: list[torch.Tensor], errors: list[torch.Tensor]) -> float:
    """Least-squares scalar β minimising Σ‖e − β d‖² (d: extrapolation direction, e: true change)."""
    num = sum(float((d.double() * e.double()).sum()) for d, e in zip(directions, errors))
    den = sum(float((d.double() ** 2).sum()) for d in directions)
    return num / den if den > 0 else 0.0
