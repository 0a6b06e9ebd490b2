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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from . import _calibration_file as _file
from . import _classic_fit, forecast_fit


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
    from .passes.outline_blocks import PREFIX, _value

    calls = [n for n in outlined.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)]
    widths = []
    for call in calls:
        widths.append([int(_value(call.args[p]).shape[-1]) for p in call.meta["fastcache_streams"]])
    return {"num_blocks": len(calls), "widths": widths, "param_hash": param_hash(outlined, args)}


def param_hash(graph: fx.GraphModule, args: Sequence[Any]) -> str:
    """Digest of the parameters and buffers among a graph's inputs ``args`` (which model instance it is)."""
    from .passes.outline_blocks import _is_state_input

    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    return _param_hash(a for n, a in zip(placeholders, args) if isinstance(a, torch.Tensor) and _is_state_input(n))


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

    def check_instance(self, graph: fx.GraphModule, args: Sequence[Any]) -> None:
        """``check``'s parameter test for another model instance served by an already built graph."""
        mine = param_hash(graph, args)
        if mine != self.fingerprint.get("param_hash"):
            raise ValueError(
                f"calibration file does not belong to this model instance: its parameters hash to {mine!r}, "
                f"the file was fitted on {self.fingerprint.get('param_hash')!r}. Compile this instance without "
                "options['calibration'], or re-run fastcache_compile.calibrate(...) on it."
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


def calibrate(
    model: torch.nn.Module,
    run: Callable[[torch.nn.Module], Any],
    path: str | os.PathLike[str] | None = None,
    *,
    ridge: float = 1e-3,
    max_rows: int = 1024,
    drift: dict[str, Any] | None = None,
    drift_run: Callable[[torch.nn.Module], Any] | None = None,
    forecast_orders: tuple[int, ...] = forecast_fit.ORDERS,
    forecast_max_gap: int = forecast_fit.MAX_GAP,
) -> Calibration:
    """Fit the skip-path maps of ``model`` from full computations driven by ``run``.

    ``run(m)`` must call ``m`` the way inference does (e.g. a few short sampling loops with the
    scheduler, seeds and guidance you use); each generation needs at least 3 steps. Returns the
    ``Calibration`` and writes it to ``path`` if given (load it with ``options={"calibration": path}``).

    ``drift``: the backend options you deploy the forecaster with (``threshold`` at least, e.g.
    ``{"threshold": 0.2, "num_steps": 20}``). Then ``drift_run`` (default: ``run``; better, other
    seeds) runs again with the cache on, every skip is also computed, and the conformal cutoff must
    hold on those drifted (ê, e) pairs too (``fastcache_compile.drift``).

    ``forecast_orders``: the forecaster orders K compared on held-out generations (one forces it; a
    smaller K needs fewer computed steps before its first skip). ``forecast_max_gap``: the largest step
    gap its weight table covers, so a block skips at most ``forecast_max_gap − 1`` steps in a row (4
    suits ~20 steps; larger gaps pay off with more sampling steps).
    """
    import torch._dynamo

    from . import drift as _drift
    from .backend import fastcache_backend
    from .config import FastCacheConfig
    from .runtime import recording

    # options are checked before the long recording
    forecast_fit.check_options(forecast_orders, forecast_max_gap)
    drift_options = None if drift is None else _drift.check_options(drift)
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
    train_fit = _classic_fit.fit(train, rec.layouts, ridge) | _classic_fit.fit_stack(train, rec.layouts, ridge)
    scores = _classic_fit.score(held, rec.layouts, train_fit)
    stack_scores = _classic_fit.score_stack(held, rec.layouts, train_fit)
    tensors = _classic_fit.fit(seqs, rec.layouts, ridge) | _classic_fit.fit_stack(seqs, rec.layouts, ridge)
    recommended = min(scores, key=scores.get)
    fc_tensors, fc_metrics = (
        forecast_fit.fit(seqs, rec.layouts, orders=forecast_orders, max_gap=forecast_max_gap)
        if len(seqs) >= 2
        else ({}, {})
    )
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
