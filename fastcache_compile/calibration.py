"""Fit the skip-path maps on full computations of the user's own model and store them.

``calibrate(model, run)`` compiles ``model`` with the fastcache backend at τ = 0 (every block
computes), lets ``run`` drive a few calls or generations, records each block's input ``x`` and
residual ``r = y − x`` per step, and fits by closed form (``approx.ridge`` / ``approx.fit_beta``):

* ``trajectory``: one β per block for ``y ≈ x + r̂ + β (r̂ − r̂′)(t − s)/(s − s′)``,
* ``linear``: ``A − I`` per block output for ``y ≈ ŷ + A (x − x̂)`` (ridge towards plain reuse),
* ``direct``: ``W, b`` per block output for ``y ≈ W x + b``,
* ``forecast``: per block a table of weights ``ŷ = x + Σ_k w_k r̂_k`` over the last K computed residuals
  per gap pattern, the order K chosen on held-out generations, and a conformal error model
  (``forecast_fit``),
* ``W_s`` for the block stack as a whole, ``R ≈ R̂ + (x0 − x̂0) W_sᵀ``: the correction token selection
  adds to the cached output of tokens it does not run.

Each form is scored on held-out steps (skips of 1–3 steps, the situation it is used in) and the
best becomes ``recommended``. The file is safetensors with a fingerprint of the model (block count,
hidden widths, parameter hash); loading it for another model raises ``ValueError``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import _calibration_file as _file
from . import approx, forecast_fit

_GAPS = (1, 2, 3)  # skip lengths the fit and the held-out score consider


def _param_hash(tensors: Iterable[torch.Tensor]) -> str:
    # Order-independent: per-tensor digests of shape and a strided value sample, sorted.
    digests = []
    for t in tensors:
        flat = t.detach().reshape(-1).float()
        if flat.numel() > 65536:
            flat = flat[:: flat.numel() // 65536 + 1]
        digests.append(hashlib.sha256(str(tuple(t.shape)).encode() + flat.cpu().numpy().tobytes()).hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:32]


def graph_fingerprint(outlined: fx.GraphModule, args: list[Any]) -> dict[str, Any]:
    """Block count, stream widths and parameter hash of an outlined graph and its inputs."""
    from .passes.outline_blocks import PREFIX, _is_state_input, _value

    calls = [n for n in outlined.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)]
    widths = []
    for call in calls:
        widths.append([int(_value(call.args[p]).shape[-1]) for p in call.meta["fastcache_streams"]])
    placeholders = [n for n in outlined.graph.nodes if n.op == "placeholder"]
    params = [a for n, a in zip(placeholders, args) if isinstance(a, torch.Tensor) and _is_state_input(n)]
    return {"num_blocks": len(calls), "widths": widths, "param_hash": _param_hash(params)}


@dataclass
class Calibration:
    """Fitted skip-path maps of one model."""

    fingerprint: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    recommended: str = "reuse"
    metrics: dict[str, Any] = field(default_factory=dict)

    def block_params(self, form: str) -> dict[int, dict[str, torch.Tensor]]:
        if form == "forecast":
            return forecast_fit.block_params(self.tensors)
        prefix = {"trajectory": ("beta",), "linear": ("a",), "direct": ("w", "b")}.get(form, ())
        out: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in self.tensors.items():
            kind, block, *rest = name.split(".")
            if kind in prefix:
                out.setdefault(int(block), {})["_".join([kind, *rest])] = value
        return out

    def stack_params(self) -> dict[str, torch.Tensor]:
        """``W_s`` of the static-token correction (token selection), if this file has one."""
        return {"w": self.tensors["stack.w"]} if "stack.w" in self.tensors else {}

    def check(self, outlined: fx.GraphModule, args: list[Any]) -> None:
        mine = graph_fingerprint(outlined, args)
        for key in ("num_blocks", "widths", "param_hash"):
            if mine[key] != self.fingerprint.get(key):
                raise ValueError(
                    f"calibration file does not belong to this model: {key} is {self.fingerprint.get(key)!r} in "
                    f"the file but {mine[key]!r} here. Re-run fastcache_compile.calibrate(...) on this model."
                )

    def save(self, path: str | os.PathLike[str]) -> None:
        _file.write(path, self.fingerprint, self.tensors, self.recommended, self.metrics)


def load(path: str | os.PathLike[str]) -> Calibration:
    """Read a file written by ``calibrate``; ``ValueError`` naming the file and the fix if it is unusable
    (missing, a directory, truncated or corrupt, another format, NaN/Inf values, missing or misshapen
    tensors). Whether it belongs to the model is checked later, by ``Calibration.check``."""
    fingerprint, tensors, recommended, metrics = _file.read(path)
    return Calibration(fingerprint, tensors, recommended, metrics)


# -- recording ---------------------------------------------------------------------------------------
@dataclass
class _Recording:
    max_rows: int
    # (runtime id, stream key) -> generations -> steps -> per block: ([x rows per stream], [r rows per output])
    runs: dict[tuple[int, bytes], list[list[list[tuple[list[torch.Tensor], list[torch.Tensor]]]]]] = field(
        default_factory=dict
    )
    fingerprint: dict[str, Any] | None = None
    layouts: list[Any] | None = None
    _rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def __call__(self, runtime: Any, key: bytes, step: int, state: list[torch.Tensor], variant: Any) -> None:
        if self.layouts is None:
            self.layouts, self.fingerprint = variant.layouts, variant.fingerprint
        gens = self.runs.setdefault((id(runtime), key), [])
        if step == 0 or not gens:
            gens.append([])
        per_block = []
        cursor = 0
        for lay in variant.layouts:
            chunk = state[cursor : cursor + lay.num_state]
            cursor += lay.num_state
            n_s, n_o = len(lay.streams), len(lay.pairs)
            xs = [self._take(x, n_s) for x in chunk[:n_s]]
            rs = [self._take(r, n_s) for r in chunk[n_s : n_s + n_o]]
            per_block.append((xs, rs))
        gens[-1].append(per_block)

    def _take(self, t: torch.Tensor, salt: int) -> torch.Tensor:
        rows = t.detach().float().reshape(-1, t.shape[-1]).cpu()  # (B*N, D)
        k = (rows.shape[0], salt)
        if k not in self._rows:
            g = torch.Generator().manual_seed(rows.shape[0])
            self._rows[k] = torch.randperm(rows.shape[0], generator=g)[: self.max_rows]
        return rows[self._rows[k]]


def _sequences(rec: _Recording) -> list[list]:
    return [gen for gens in rec.runs.values() for gen in gens if len(gen) >= 3]


def _fit(seqs: list[list], layouts: list[Any], ridge: float) -> dict[str, torch.Tensor]:
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


def _fit_stack(seqs: list[list], layouts: list[Any], ridge: float) -> dict[str, torch.Tensor]:
    """``W_s`` for ``R ≈ R̂ + (x0 − x̂0) W_sᵀ``: the static-token correction of token selection."""
    pairs = _stack_pairs(seqs, layouts)
    if not pairs:
        return {}
    dx_all = torch.cat([x_t - x_s for (x_s, _), (x_t, _) in pairs])
    dr_all = torch.cat([r_t - r_s for (_, r_s), (_, r_t) in pairs])
    lam = ridge * float((dx_all**2).sum()) / max(dx_all.shape[0], 1)
    w, _ = approx.ridge(dx_all, dr_all, lam, bias=False)
    return {"stack.w": w}


def _score_stack(seqs: list[list], layouts: list[Any], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
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


def _score(seqs: list[list], layouts: list[Any], tensors: dict[str, torch.Tensor]) -> dict[str, float]:
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


def calibrate(
    model: torch.nn.Module,
    run: Callable[[torch.nn.Module], Any],
    path: str | os.PathLike[str] | None = None,
    *,
    ridge: float = 1e-3,
    max_rows: int = 1024,
    drift: dict[str, Any] | None = None,
    drift_run: Callable[[torch.nn.Module], Any] | None = None,
) -> Calibration:
    """Fit the skip-path maps of ``model`` from full computations driven by ``run``.

    ``run(m)`` must call ``m`` the way inference does (e.g. a few short sampling loops with the
    scheduler, seeds and guidance you use); each generation needs at least 3 steps. Returns the
    ``Calibration`` and writes it to ``path`` if given (load it with ``options={"calibration": path}``).

    ``drift``: the backend options you deploy the forecaster with (``threshold`` at least, e.g.
    ``{"threshold": 0.2, "num_steps": 20}``). Then ``drift_run`` (default: ``run``; better, other
    seeds) runs again with the cache on, every skip is also computed, and the conformal cutoff must
    hold on those drifted (ê, e) pairs too (``fastcache_compile.drift``).
    """
    import torch._dynamo

    from . import drift as _drift
    from .backend import fastcache_backend
    from .config import FastCacheConfig
    from .runtime import recording

    drift_options = None if drift is None else _drift.check_options(drift)  # before the long recording
    base = getattr(model, "_orig_mod", model)
    rec = _Recording(max_rows=max_rows)
    cfg = FastCacheConfig(threshold=0.0, warmup_steps=0, lowering="eager", max_streams=64)
    compiled = torch.compile(base, backend=lambda gm, ex: fastcache_backend(gm, ex, cfg))
    with recording(rec), torch.no_grad():
        run(compiled)
    torch._dynamo.reset()  # the recording graphs are of no further use
    seqs = _sequences(rec)
    if rec.layouts is None or not seqs:
        raise ValueError(
            "calibrate recorded no usable generation: run(m) must call m for at least 3 steps of one generation"
        )
    # Pick the form on generations the fit did not see (every fourth, at least the last one); a
    # single generation can only be scored in-sample, which favours the D×D maps.
    held = seqs[3::4] or seqs[-1:]
    train = [s for s in seqs if all(s is not h for h in held)] or seqs
    heldout = train is not seqs
    train_fit = _fit(train, rec.layouts, ridge) | _fit_stack(train, rec.layouts, ridge)
    scores = _score(held, rec.layouts, train_fit)
    stack_scores = _score_stack(held, rec.layouts, train_fit)
    tensors = _fit(seqs, rec.layouts, ridge) | _fit_stack(seqs, rec.layouts, ridge)
    recommended = min(scores, key=scores.get)
    fc_tensors, fc_metrics = forecast_fit.fit(seqs, rec.layouts) if len(seqs) >= 2 else ({}, {})
    tensors |= fc_tensors
    metrics = {
        **fc_metrics,
        "heldout_rel_error": scores,
        "scored_on_heldout_generations": heldout,
        "generations": len(seqs),
        "steps": sum(len(s) for s in seqs),
        "beta": [float(tensors[f"beta.{i}"]) for i in range(len(rec.layouts))],
        "static_token_heldout_rel_error": stack_scores,
    }
    assert rec.fingerprint is not None
    calib = Calibration(rec.fingerprint, tensors, recommended, metrics)
    if drift_options is not None:
        if not fc_tensors:
            raise ValueError("drift needs the forecaster, which needs at least 2 calibration generations")
        pairs, drift_metrics = _drift.observe(base, drift_run or run, calib, drift_options)
        calib.tensors |= pairs
        calib.metrics["forecast_drift"] = drift_metrics
    if path is not None:
        calib.save(path)
    return calib
