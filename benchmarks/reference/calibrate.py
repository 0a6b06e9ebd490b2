"""Fit FastCache's skip-path maps for the reference DiT and ship them beside its weights.

    python -m benchmarks.reference.calibrate

Runs 3 full 50-step DDIM generations (8 images each, batched CFG; seeds 1000+, disjoint from every
benchmark seed) through ``fastcache_compile.calibrate`` and writes
``benchmarks/reference/dit-fmnist/fastcache_calibration.safetensors`` plus a JSON summary
(held-out error of each approximation form, fitted β per block).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastcache_compile as fc
from benchmarks.reference.pipeline import DEFAULT_PATH, load_reference, sample

CALIBRATION_FILE = DEFAULT_PATH / "fastcache_calibration.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()

    model = load_reference()

    def run(m: torch.nn.Module) -> None:
        for g in range(args.generations):
            labels = torch.arange(args.batch) % 10
            sample(m, labels, seed=1000 + 100 * g, steps=args.steps)

    t0 = time.perf_counter()
    calib = fc.calibrate(model, run, args.out, max_rows=256)
    summary = {
        "command": "python -m benchmarks.reference.calibrate",
        "wall_s": round(time.perf_counter() - t0, 1),
        "recommended": calib.recommended,
        **calib.metrics,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
