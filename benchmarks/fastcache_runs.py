"""``torch.compile`` rows of the comparison: uncached Inductor and the fastcache backend.

``Compiled`` follows the ``Baseline`` interface of ``benchmarks.baselines`` so the harness times every
method the same way. Each row compiles its own copy of the model once, on first use, and keeps it
through the interleaved timing (``benchmarks.compare`` raises Dynamo's recompile limit so that the
rows' graphs coexist rather than one silently falling back to eager). Whatever resets Dynamo
(calibration, shadow runs) runs before the first compile or after the timing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

import fastcache_compile
from fastcache_compile.calibration import load as load_calibration
from fastcache_compile.runtime import shadow_errors


class Compiled:
    """``torch.compile(model, backend=..., options=...)`` while active.

    The fastcache runtime starts a new generation by itself when the timestep jumps back up, so
    ``reset`` between generations is a no-op (``fastcache_compile.reset`` would also wipe the skip
    statistics); ``clear_stats`` after the warm-up does call it.
    """

    granularity = "block"

    def __init__(
        self,
        base: torch.nn.Module,
        method: str,
        setting: str,
        lowering: str,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.base = base
        self.method = method
        self.setting = setting
        self.lowering = lowering
        self.options = options
        self.notes = ""
        self.model: Any = base

    @property
    def is_fastcache(self) -> bool:
        return self.options is not None

    def __enter__(self) -> Compiled:
        if self.model is self.base:  # compiled lazily by the first call, once per row
            if self.is_fastcache:
                self.model = torch.compile(self.base, backend="fastcache", options=self.options)
            elif self.lowering == "inductor":
                self.model = torch.compile(self.base)
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def reset(self) -> None:
        pass

    def clear_stats(self) -> None:
        if self.is_fastcache:
            fastcache_compile.reset(self.model)

    def stats(self) -> dict[str, Any]:
        return fastcache_compile.stats(self.model) if self.is_fastcache else {}

    def flops_skipped(self, attention_fraction_of_block: float) -> float:
        # With token selection a block that ran on k of N tokens counts k/N of its work.
        return 1.0 - float(self.stats().get("work_fraction", 1.0))


def fastcache_options(
    threshold: float, approximation: str, lowering: str, steps: int, calibration: Path | None, alpha: float
) -> dict[str, Any]:
    return {
        "threshold": threshold,
        "alpha": alpha,
        "warmup_steps": 2,
        "num_steps": steps,  # the last step always computes
        "calibration": None if approximation == "reuse" else (str(calibration) if calibration else None),
        "approximation": approximation,
        "lowering": lowering,
    }


def _calibration_fits(model: torch.nn.Module, path: Path, probe: Callable[[Any], Any]) -> str | None:
    """None if ``path`` belongs to ``model``, else why not (the backend checks the fingerprint on first call)."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(
            model, backend="fastcache", options={"calibration": str(path), "approximation": "auto", "lowering": "eager"}
        )
        probe(compiled)
        return None
    except ValueError as err:
        return str(err)
    finally:
        torch._dynamo.reset()


def ensure_calibration(
    model: torch.nn.Module,
    path: Path,
    run: Callable[[Any], Any],
    probe: Callable[[Any], Any],
    need_forecast: bool = False,
    **fit: Any,
) -> dict[str, Any]:
    """Use the calibration file at ``path`` if it belongs to ``model``; otherwise fit one with
    ``run`` (a few short generations of seeds the benchmark does not use) and save it there; ``fit``:
    further ``calibrate`` options (the forecaster's gap range, drift pairs). A file fitted with another
    gap range is refitted.

    The reference checkpoint is rewritten while training runs, and a calibration is pinned to the
    weights by its fingerprint, so a stale file is refitted rather than failing the benchmark.
    """
    info: dict[str, Any] = {"path": path.name}
    if path.exists():
        why = _calibration_fits(model, path, probe)
        calib = load_calibration(path) if why is None else None
        metrics = calib.metrics if calib is not None else {}
        if why is None and need_forecast and "forecast_order" not in metrics:
            why = "fitted before the forecaster existed (no forecast weights)"
        gap = fit.get("forecast_max_gap")
        if why is None and need_forecast and gap is not None and metrics.get("forecast_max_gap") != gap:
            why = f"its forecaster covers gaps up to {metrics.get('forecast_max_gap')}, the plan asks for {gap}"
        if why is None and calib is not None:
            info.update(source="shipped", recommended=calib.recommended, metrics=calib.metrics)
            return info
        info["stale_reason"] = why
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calib = fastcache_compile.calibrate(model, run, path, **fit)
    info.update(source="calibrated now", recommended=calib.recommended, metrics=calib.metrics)
    return info


def bound_violations(
    base: torch.nn.Module, options: dict[str, Any], run: Callable[[Any], Any]
) -> tuple[float | None, int]:
    """Fraction of skipped blocks whose true relative output error ‖ŷ − y‖/‖y‖ exceeded τ, from an eager
    run of the same setting under ``shadow_errors`` (which also computes every skipped block)."""
    eager = dict(options, lowering="eager")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(base, backend="fastcache", options=eager)
        with shadow_errors() as errors:
            run(compiled)
    finally:
        torch._dynamo.reset()
    if not errors:
        return None, 0
    tau = float(options["threshold"])
    return sum(err > tau for _, err in errors) / len(errors), len(errors)
