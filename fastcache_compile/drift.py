"""Conformal pairs observed under caching: the second pass of ``calibrate(..., drift=options)``.

The forecaster's held-out (ê, e) pairs come from full computations: every history residual and every
block input is exact. In a cached run they are not: a block's input carries the errors of the blocks
and steps skipped before it, and its history was computed on drifted inputs, so the true error of a
skip is larger than on calibration data and the rank rule's bound (P(e > τ | skipped) ≤ α) no longer
covers it (measured: 7.4 % at τ = 0.2, α = 0.05 on the reference MMDiT).

This pass runs the calibration generations again with the cache on, under the deployment options
(τ, α, warm-up, refresh policy), computes every skipped block as well and stores each skip's
(ê, true error) per block. At compile time the cutoff is the largest one that passes the rank rule on
both pair sets (``conformal.joint_cutoff``); a block that never skipped in the pass never skips.

Caveats: the pairs were drawn under the first cutoff, which the second can only lower, so deployed
runs skip less and drift less than the pairs did (conservative); for a τ above the pass's, the pairs
only cover predictions up to the pass's cutoff (the cutoff cannot rise above what was observed);
skips within one generation are not independent.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .passes.block_state import _PAIRS, collecting

_RUNTIME_KEYS = (
    "threshold",
    "alpha",
    "warmup_steps",
    "num_steps",
    "max_streams",
    "refresh_every",
    "refresh_steps",
    "max_skips",
)


def check_options(options: Any) -> dict[str, Any]:
    """The drift pass's backend options; a ``ValueError`` saying what to pass otherwise."""
    if not isinstance(options, dict) or "threshold" not in options:
        raise ValueError(
            "drift must be the backend options you deploy with, at least the threshold, e.g. "
            f"drift={{'threshold': 0.2, 'num_steps': 20}}; got {options!r}"
        )
    unknown = sorted(set(options) - set(_RUNTIME_KEYS))
    if unknown:
        raise ValueError(f"drift options may only be {list(_RUNTIME_KEYS)}; got {unknown}")
    from .config import FastCacheConfig

    cfg = FastCacheConfig.from_options(dict(options))  # bad values fail here, not after the long recording
    # the normalised values (a range of refresh steps as a tuple): they go into the file's JSON metrics
    return {key: getattr(cfg, key) for key in options}


def observe(
    model: torch.nn.Module, run: Callable[[torch.nn.Module], Any], calibration: Any, options: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``fc_dpred.{i}`` / ``fc_derr.{i}`` tensors and metrics from one cached pass of ``run``."""
    import torch._dynamo

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "calibration.safetensors"
        calibration.save(path)
        opts = {**options, "approximation": "forecast", "calibration": os.fspath(path), "lowering": "eager"}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fastcache", options=opts)
        with collecting(_PAIRS) as pairs, torch.no_grad():
            run(compiled)
        torch._dynamo.reset()
    tensors: dict[str, torch.Tensor] = {}
    # every block with a forecaster gets its (possibly empty) set: none observed means none certified
    by_block: dict[int, list[tuple[float, float]]] = {
        int(name.split(".")[1]): [] for name in calibration.tensors if name.startswith("fc_table.")
    }
    for block, e_hat, err in pairs:
        by_block.setdefault(block, []).append((e_hat, err))
    for block, rows in sorted(by_block.items()):
        tensors[f"fc_dpred.{block}"] = torch.tensor([r[0] for r in rows], dtype=torch.float32)
        tensors[f"fc_derr.{block}"] = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    tau = float(options["threshold"])
    metrics = {
        "options": {k: v for k, v in options.items()},
        "skips": len(pairs),
        "pairs_per_block": {str(b): len(r) for b, r in sorted(by_block.items())},
        # the pass's own audit: skips whose true error exceeded τ under the full-computation cutoff
        "violation_rate": sum(err > tau for _, _, err in pairs) / len(pairs) if pairs else 0.0,
    }
    return tensors, metrics
