"""A study-only ``fastcache`` backend with the ``forecast`` skip path (until the main backend takes the form).

Same pipeline as ``fastcache_compile.backend`` for block caching (outline, ``insert_cache`` /
``insert_recording``, eager lowering, ``CacheRuntime``), with the forecaster weights from a calibration
file, the state history they need, and optionally the conformal decision (without it, the χ² rule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import fx

from fastcache_compile import calibration
from fastcache_compile.backend import _outlined
from fastcache_compile.config import FastCacheConfig
from fastcache_compile.passes import insert_cache, insert_recording
from fastcache_compile.passes.insert_cache import state_history
from fastcache_compile.runtime import CacheRuntime, Variant


def forecast_backend(path: Path, tau: float, alpha: float, *, conformal: bool = True, audit: bool = False) -> Callable:
    calib = calibration.load(path)
    params = calib.block_params("forecast")
    if not conformal:  # keep the weights, drop the conformal pairs: the χ² rule decides
        params = {i: {k: v for k, v in p.items() if k in ("table",)} for i, p in params.items()}
    history = state_history("forecast", params)
    config = FastCacheConfig(threshold=tau, alpha=alpha, lowering="eager", warmup_steps=2)

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        def build(graph: fx.GraphModule, args: Sequence[Any]) -> Variant:
            cached = _outlined(graph, args)
            fingerprint = calibration.graph_fingerprint(cached, list(args))
            calib.check(cached, list(args))
            cached = insert_cache(cached, tau, alpha, "forecast", params, audit=audit)
            init = insert_recording(_outlined(graph, args), history=history)
            n_out = cached.meta["fastcache_num_outputs"]
            seq = cached.meta["fastcache_output_is_seq"]
            return Variant(init, cached, n_out, seq, cached.meta["fastcache_layouts"], fingerprint)

        def plain(_args: Sequence[Any]) -> Callable:
            return gm

        return CacheRuntime(gm, example_inputs, config, build, plain)

    return backend
