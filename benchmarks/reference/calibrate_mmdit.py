"""Fit FastCache's calibration for the reference MMDiT, with drift pairs, and ship it in the package.

    python -m benchmarks.reference.calibrate_mmdit [--out PATH]

The fit is what ``benchmarks.compare`` does when no calibration fits: 4 generations of 4 samples at the
model's 20 steps with batched CFG, seeds 1 000 000+ (disjoint from every evaluated seed), with the
forecaster's table covering gaps of up to 6 steps. The drift pass (``calibrate(..., drift=...)``) then
runs 4 more generations of 4 samples, seeds 2 000 000+, with the forecaster deployed at τ = 0.3 and a
synchronised refresh every 5 steps (the benchmark's best row; warm-up 2) and stores every skip's
(predicted, true) error, so the conformal cutoff also holds under the drift caching causes.
Writes ``fastcache_compile/reference/mmdit-fmnist/fastcache_calibration.safetensors`` and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastcache_compile as fc
from fastcache_compile.reference import model as mmdit

OUT = mmdit.DEFAULT_PATH / "fastcache_calibration.safetensors"
# The deployment the drift pairs are recorded under: the compare's best row (a synchronised refresh every
# 5 steps, the last step not forced), which the weight table's gaps of up to 6 steps make possible.
DRIFT = {"threshold": 0.3, "alpha": 0.05, "warmup_steps": 2, "refresh_every": 5}
MAX_GAP = 6


def _runs(ref: mmdit.Reference, first_seed: int, generations: int = 4, size: int = 4):
    def run(m: torch.nn.Module) -> None:
        for g in range(generations):
            idx = list(range(g * size, (g + 1) * size))
            mmdit.sample(ref, m, torch.tensor(idx) % 10, [first_seed + i for i in idx])

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ref = mmdit.load()
    t0 = time.perf_counter()
    calib = fc.calibrate(
        ref.transformer,
        _runs(ref, 1_000_000),
        args.out,
        drift=DRIFT,
        drift_run=_runs(ref, 2_000_000),
        forecast_max_gap=MAX_GAP,
    )
    summary = {
        "command": "python -m benchmarks.reference.calibrate_mmdit",
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    summary |= {"recommended": calib.recommended, **calib.metrics}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["forecast_drift"], indent=2))


if __name__ == "__main__":
    main()
