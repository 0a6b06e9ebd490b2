"""Closed-form fits of the classic skip-path forms and the stack correction, and their held-out scores.

On recorded sequences (per generation, per step: each block's inputs and residuals), ``fit`` solves the
trajectory β, the ``linear`` A and the ``direct`` W, b per block by ridge least squares
(``approx.ridge`` / ``approx.fit_beta``); ``fit_stack`` the token-selection correction ``W_s``; the
``score`` functions measure each form's relative error on held-out steps for skips of 1–3 steps.
"""

from __future__ import annotations

from typing import Any

import torch

from . import approx

_GAPS = (1, 2, 3)  # skip lengths the fit and the held-out score consider


def fit(seqs: list[list], layouts: list[Any], ridge: float) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for i, lay in enumerate(layouts):
        dirs, errs = [], []
        for k, p in enumerate(lay.pairs):
            if p is None:
                continue
            j = lay.streams.index(p)
            dx, dr, xs, ys = [], [], [], []
            for gen in seqs:
                for s in range(len(gen)):
                    x_s, r_s = gen[s][i][0][j], gen[s][i][1][k]
                    xs.append(x_s)
                    ys.append(x_s + r_s)
                    for g in _GAPS:
                        if s + g >= len(gen):
                            continue
                        x_t, r_t = gen[s + g][i][0][j], gen[s + g][i][1][k]
                        dx.append(x_t - x_s)
                        dr.append(r_t - r_s)
                        if s >= 1:
                            dirs.append((r_s - gen[s - 1][i][1][k]) * g)
                            errs.append(r_t - r_s)
            dx_all, dr_all = torch.cat(dx), torch.cat(dr)
            lam = ridge * float((dx_all**2).sum()) / max(dx_all.shape[0], 1)
            a, _ = approx.ridge(dx_all, dr_all, lam, bias=False)
            tensors[f"a.{i}.{k}"] = a
            x_cat, y_cat = torch.cat(xs), torch.cat(ys)
            lam = ridge * float((x_cat**2).sum()) / max(x_cat.shape[0], 1)
            w, b = approx.ridge(x_cat, y_cat, lam, bias=True)
            tensors[f"w.{i}.{k}"], tensors[f"b.{i}.{k}"] = w, b
        tensors[f"beta.{i}"] = torch.tensor(approx.fit_beta(dirs, errs) if dirs else 0.0)
    return tensors


def _stack_rows(step: list, layouts: list[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Block-stack entry ``x0`` and stack residual ``R = y_L − x0`` of the image stream at one step.

    The image stream is block 0's stream with the most rows; its final value is the last block's
    paired output of the same row count. Rows line up across blocks: ``_take`` samples the same rows
    of every tensor with the same row count.
    """
    xs0 = step[0][0]
    if not xs0:
        return None
    x0 = max(xs0, key=lambda x: x.shape[0])
    if sum(x.shape[0] == x0.shape[0] for x in xs0) != 1:
        return None  # image and text streams of the same length: ambiguous
    last, (xs_l, rs_l) = layouts[-1], step[-1]
    outs = [(k, last.streams.index(p)) for k, p in enumerate(last.pairs) if p is not None and rs_l[k].shape == x0.shape]
    if len(outs) != 1:
        return None
    k, j = outs[0]
    return x0, xs_l[j] + rs_l[k] - x0


def _stack_pairs(seqs: list[list], layouts: list[Any]) -> list[tuple[tuple, tuple]] | None:
    """``((x0, R) at step s, (x0, R) at step s + g)`` for every gap g in ``_GAPS``; None if the image
    stream cannot be told (then there is no static-token correction)."""
    pairs = []
    for gen in seqs:
        rows = [_stack_rows(step, layouts) for step in gen]
        if any(r is None for r in rows):
            return None
        pairs += [(rows[s], rows[s + g]) for s in range(len(rows)) for g in _GAPS if s + g < len(rows)]
    return pairs


def fit_stack(seqs: list[list], layouts: list[Any], ridge: float) -> dict[str, torch.Tensor]:
    """``W_s`` for ``R ≈ R̂ + (x0 − x̂0) W_sᵀ``: the static-token correction of token selection."""
    pairs = _stack_pairs(seqs, layouts)
    if not pairs:
        return {}
    dx_all = torch.cat([x_t - x_s for (x_s, _), (x_t, _) in pairs])
    dr_all = torch.cat([r_t - r_s for (_, r_s), (_, r_t) in pairs])
    lam = ridge * float((dx_all**2).sum()) / max(dx_all.shape[0], 1)
    w, _ = approx.ridge(dx_all, dr_all, lam, bias=False)
    return {"stack.w": w}


def score_stack(seqs: list[list], layouts: list[Any], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out relative error of a static token's stack output, plain reuse vs. the ``W_s`` correction."""
    pairs = _stack_pairs(seqs, layouts)
    if "stack.w" not in tensors or not pairs:
        return {}
    errors: dict[str, list[float]] = {"reuse": [], "linear": []}
    for (x_s, r_s), (x_t, r_t) in pairs:
        y_t = x_t + r_t
        norm = float(y_t.norm()) + 1e-12
        errors["reuse"].append(float((approx.reuse(x_t, r_s) - y_t).norm()) / norm)
        errors["linear"].append(float((approx.linear(x_t, x_s, r_s, tensors["stack.w"]) - y_t).norm()) / norm)
    return {f: sum(v) / len(v) for f, v in errors.items()}


def score(seqs: list[list], layouts: list[Any], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean relative error of each form when block outputs are predicted 1–3 steps ahead."""
    errors: dict[str, list[float]] = {f: [] for f in approx.FORMS}
    for i, lay in enumerate(layouts):
        for k, p in enumerate(lay.pairs):
            if p is None:
                continue
            j = lay.streams.index(p)
            for gen in seqs:
                for s in range(1, len(gen)):
                    for g in _GAPS:
                        if s + g >= len(gen):
                            continue
                        x_s, r_s, r_p = gen[s][i][0][j], gen[s][i][1][k], gen[s - 1][i][1][k]
                        x_t, r_t = gen[s + g][i][0][j], gen[s + g][i][1][k]
                        y_t = x_t + r_t
                        t, s_, sp = torch.tensor(float(s + g)), torch.tensor(float(s)), torch.tensor(float(s - 1))
                        preds = {
                            "reuse": approx.reuse(x_t, r_s),
                            "trajectory": approx.trajectory(x_t, r_s, r_p, t, s_, sp, tensors[f"beta.{i}"]),
                            "linear": approx.linear(x_t, x_s, r_s, tensors[f"a.{i}.{k}"]),
                            "direct": approx.direct(x_t, tensors[f"w.{i}.{k}"], tensors[f"b.{i}.{k}"]),
                        }
                        norm = float(y_t.norm()) + 1e-12
                        for form, pred in preds.items():
                            errors[form].append(float((pred - y_t).norm()) / norm)
    return {f: sum(v) / len(v) for f, v in errors.items() if v}
