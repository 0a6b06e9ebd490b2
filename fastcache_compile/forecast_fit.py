"""Fit the multi-step forecaster and its conformal error model on recorded calibration sequences.

Input: what ``calibration._Recording`` collected, one list per generation of steps, each step per block
``([x rows per stream], [r rows per output])`` (rows sampled identically for every tensor of a row
count). Everything below works on per-sequence inner-product matrices over steps, computed once per
block:

* ``M[a, b] = ⟨r_a, r_b⟩`` (paired outputs concatenated): the forecaster's normal equations and errors,
* ``X[a, b] = ⟨x_a, x_b⟩`` (streams concatenated): the decision statistic ``δ²(t, s)``,
* ``Y[t] = ‖x_t + r_t‖²``: the norm of the true output for relative errors.

Per block and order ``K`` the weight table is fitted on the training generations and scored on the
held-out ones over every (step, gap pattern) a ``K_max`` history allows, so all orders are compared on
the same forecasts. For the chosen order, the log-linear error model is fitted on training forecasts,
and the held-out pairs ``(ê, e)`` are stored: ``conformal.skip_cutoff`` turns them into a cutoff for
whatever ``τ, α`` the user compiles with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import conformal, forecast

ORDERS = (1, 2, 3)  # forecaster orders K compared by held-out error (default)
# Weight-table gap range (default). In-graph a block skips only while t − s_1 < max_gap (at most
# max_gap − 1 skips in a row), so the gaps of its history, between computes, never exceed max_gap.
# 4 suits ~20 steps; longer samplers can take larger gaps (the table has max_gap**K rows).
MAX_GAP = 4
MAX_PAIRS = 4096  # held-out (ê, e) pairs kept per block in the file


@dataclass
class _Grams:
    ms: list[torch.Tensor]  # per paired output: (T, T) residual inner products
    ys: list[torch.Tensor]  # per paired output: (T,) squared output norms
    x: torch.Tensor  # (T, T) input inner products, streams concatenated

    @property
    def m(self) -> torch.Tensor:
        return sum(self.ms)  # outputs share the weights: their normal equations add


def _grams(gen: list, block: int, lay: Any) -> _Grams | None:
    paired = [(k, lay.streams.index(p)) for k, p in enumerate(lay.pairs) if p is not None]
    if not paired:
        return None
    steps = [gen[s][block] for s in range(len(gen))]
    ms, ys = [], []
    for k, j in paired:
        r = torch.stack([xs_rs[1][k].reshape(-1) for xs_rs in steps]).double()  # (T, rows·D)
        y = torch.stack([(xs_rs[0][j] + xs_rs[1][k]).reshape(-1) for xs_rs in steps]).double()
        ms.append(r @ r.T)
        ys.append((y**2).sum(1))
    x = torch.stack([torch.cat([v.reshape(-1) for v in xs_rs[0]]) for xs_rs in steps]).double()
    return _Grams(ms, ys, x @ x.T)


def _rel_errors(
    g: _Grams, table: torch.Tensor, order: int, t: torch.Tensor, s: torch.Tensor, max_gap: int
) -> torch.Tensor:
    """(E,) relative output errors of forecasts at ``t`` from the first ``order`` computed steps of ``s``:
    the worst over the block's paired outputs, as the audit measures a skipped block."""
    hist = s[:, :order]
    steps = torch.cat([t[:, None], hist], 1)  # (E, K + 1)
    w = table[forecast.pattern_index(steps[:, :-1] - steps[:, 1:], max_gap)]
    per_out = [
        (forecast.squared_errors(m, t, hist, w).clamp_min(0.0) / y[t].clamp_min(1e-30)).sqrt()
        for m, y in zip(g.ms, g.ys)
    ]
    return torch.stack(per_out).amax(0)


def _examples(num_steps: int, order: int, max_gap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, s)`` of the forecasts the graph can make: all gaps ≤ max_gap, and t − s_1 < max_gap."""
    t, s, _ = forecast.examples(num_steps, order, max_gap)
    keep = (t - s[:, 0]) < max_gap
    return t[keep], s[keep]


def _features(g: _Grams, t: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    x = g.x
    delta2 = (x[t, t] - 2 * x[t, s1] + x[s1, s1]) / x[s1, s1].clamp_min(1e-30)  # as rule.relative_change
    return conformal.error_features(delta2.float(), (t - s1).float(), t.float())


def fit(
    seqs: list[list],
    layouts: list[Any],
    *,
    ridge: float = 0.0,
    min_count: int = 4,
    orders: tuple[int, ...] = ORDERS,
    max_gap: int = MAX_GAP,
) -> tuple[dict, dict]:
    """Forecaster tensors and metrics from recorded generations (≥ 2 needed for held-out scores).

    ``orders``: the K compared (held-out mean error picks one; a single order forces it); ``max_gap``:
    the largest step gap the weight table covers.

    Tensors: ``fc_table.{i}`` (G^K, K) weights, ``fc_coef.{i}`` (4,) error model, ``fc_pred.{i}`` /
    ``fc_err.{i}`` held-out (ê, e) pairs; metrics: held-out mean relative error per order (fitted and
    fixed polynomial weights), the chosen order, and the number of held-out forecasts.
    """
    check_options(orders, max_gap)
    if len(seqs) < 2:
        raise ValueError("the forecaster needs at least 2 calibration generations (one is held out)")
    held = seqs[1::2]  # every second generation is held out: conformal pairs need fresh data
    train = seqs[0::2]
    k_max = max(orders)
    per_order: dict[str, list[float]] = {f"fitted_k{k}": [] for k in orders}
    per_order |= {f"fixed_k{k}": [] for k in orders}
    tables: dict[int, dict[int, torch.Tensor]] = {}
    grams: dict[int, tuple[list[_Grams], list[_Grams]]] = {}
    for i, lay in enumerate(layouts):
        tr = [g for g in (_grams(gen, i, lay) for gen in train) if g is not None]
        he = [g for g in (_grams(gen, i, lay) for gen in held) if g is not None]
        if not tr or not he:
            continue  # no paired output: the skip path reuses the cached output
        grams[i] = (tr, he)
        tables[i] = {}
        for k in orders:
            fitted, _ = forecast.fit_table([g.m for g in tr], k, max_gap, ridge=ridge, min_count=min_count)
            tables[i][k] = fitted
            for name, table in ((f"fitted_k{k}", fitted), (f"fixed_k{k}", forecast.lagrange_table(k, max_gap))):
                for g in he:
                    t, s = _examples(g.m.shape[0], k_max, max_gap)
                    per_order[name] += _rel_errors(g, table, k, t, s, max_gap).tolist()
    if not tables:
        raise ValueError("no block has an output paired with an input stream: nothing to forecast")
    scores = {name: sum(v) / len(v) for name, v in per_order.items() if v}
    order = min(orders, key=lambda k: scores[f"fitted_k{k}"])

    tensors: dict[str, torch.Tensor] = {}
    for i, (tr, he) in grams.items():
        table = tables[i][order]
        tensors[f"fc_table.{i}"] = table
        feats, errs = [], []
        for g in tr:
            t, s = _examples(g.m.shape[0], order, max_gap)
            feats.append(_features(g, t, s[:, 0]))
            errs.append(_rel_errors(g, table, order, t, s, max_gap))
        coef = conformal.fit_error_model(torch.cat(feats), torch.cat(errs))
        tensors[f"fc_coef.{i}"] = coef
        preds, errs = [], []
        for g in he:
            t, s = _examples(g.m.shape[0], order, max_gap)
            preds.append(conformal.predict_error(coef.double(), _features(g, t, s[:, 0]).double()))
            errs.append(_rel_errors(g, table, order, t, s, max_gap))
        pred, err = torch.cat(preds).float(), torch.cat(errs).float()
        if pred.numel() > MAX_PAIRS:  # an even thinning keeps the pairs exchangeable with fresh ones
            keep = torch.linspace(0, pred.numel() - 1, MAX_PAIRS).long()
            pred, err = pred[keep], err[keep]
        tensors[f"fc_pred.{i}"], tensors[f"fc_err.{i}"] = pred, err
    metrics = {
        "forecast_heldout_rel_error": scores,
        "forecast_order": order,
        "forecast_max_gap": max_gap,
        "forecast_heldout_forecasts": len(per_order[f"fitted_k{order}"]),
    }
    return tensors, metrics


def check_options(orders: Any, max_gap: Any) -> None:
    """``ValueError`` naming the fix for forecaster fit options ``calibrate`` cannot use."""
    if (
        not isinstance(orders, tuple)
        or not orders
        or any(isinstance(k, bool) or k not in ORDERS for k in orders)
        or len(set(orders)) != len(orders)
    ):
        raise ValueError(f"forecast_orders must be a non-empty tuple of distinct orders from {ORDERS}, got {orders!r}")
    if isinstance(max_gap, bool) or not isinstance(max_gap, int) or not 1 <= max_gap <= forecast.MAX_GAP_LIMIT:
        raise ValueError(
            f"forecast_max_gap must be an int in 1..{forecast.MAX_GAP_LIMIT} (steps between computes), got {max_gap!r}"
        )


def block_params(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Per block ``{"table", "coef", "pred", "err"}`` of a calibration's forecaster tensors, and
    ``{"dpred", "derr"}`` where the calibration also holds pairs observed under caching."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        kind, _, block = name.partition(".")
        if kind in ("fc_table", "fc_coef", "fc_pred", "fc_err", "fc_dpred", "fc_derr"):
            out.setdefault(int(block), {})[kind[3:]] = value
    return out
