"""Fitted multi-step forecaster with a conformal skip rule vs. the trajectory form, on the old reference DiT.

    python -m benchmarks.forecast_study [--samples 8] [--steps 50] [--generations 4]

1. Calibrates the reference DiT (``fastcache_compile.calibrate``: the existing forms and the forecaster,
   seeds 1000+, disjoint from the evaluated ones) and reports the held-out one-block relative error of the
   forecaster for K = 1, 2, 3, fitted per gap pattern and with fixed polynomial (TaylorSeer-like) weights.
2. Samples the evaluation seeds uncached and with each method over a τ sweep (eager lowering, one torch
   thread), every skipped block also computed (``shadow_errors``) to audit its true relative output
   error: PSNR against uncached, share of block executions skipped, violations (error > τ) among skips.

Methods: ``trajectory`` (the fitted β form with the χ² rule on the input, today's default with a
calibration); ``forecast+chi2`` (the fitted multi-step forecaster with the same χ² rule: isolates the
forecaster); ``forecast+conformal`` (the forecaster with the per-block conformal cutoff: τ is the
tolerated relative output error of a skipped block, P(error > τ | skipped) ≤ α on calibration data).

Writes benchmarks/results/forecast_study.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import fastcache_compile as fc
from benchmarks.metrics import psnr
from benchmarks.reference.pipeline import load_reference, sample
from fastcache_compile.runtime import shadow_errors

OUT = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "trajectory": (0.02, 0.03, 0.05),
    "forecast+chi2": (0.02, 0.03, 0.05),
    "forecast+conformal": (0.03, 0.1, 0.2),
}


def _compile(model: torch.nn.Module, method: str, tau: float, calib_path: Path, alpha: float) -> Any:
    torch._dynamo.reset()
    if method == "trajectory":
        options = {"threshold": tau, "alpha": alpha, "lowering": "eager", "calibration": str(calib_path)}
        return torch.compile(model, backend="fastcache", options={**options, "approximation": "trajectory"})
    from benchmarks._forecast_backend import forecast_backend

    backend = forecast_backend(calib_path, tau, alpha, conformal=method == "forecast+conformal")
    return torch.compile(model, backend=backend)


def _run(model: Any, labels: torch.Tensor, seeds: list[int], steps: int) -> torch.Tensor:
    return sample(model, labels, seed=seeds, steps=steps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--generations", type=int, default=4, help="calibration generations (half held out)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--methods", nargs="*", default=list(SETTINGS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_reference()
    labels = torch.arange(args.samples) % 10
    seeds = list(range(args.samples))

    def calib_run(m: Any) -> None:
        for g in range(args.generations):
            sample(m, torch.arange(8) % 10, seed=1000 + 100 * g, steps=args.steps)

    tmp = Path(tempfile.mkdtemp())
    calib_path = tmp / "calibration.safetensors"
    t0 = time.perf_counter()
    calib = fc.calibrate(model, calib_run, calib_path, max_rows=256)
    calib_s = time.perf_counter() - t0
    print(json.dumps({k: v for k, v in calib.metrics.items() if k.startswith("forecast")}, indent=1), flush=True)

    torch._dynamo.reset()
    ref = _run(model, labels, seeds, args.steps)
    rows = []
    for method in args.methods:
        for tau in SETTINGS[method]:
            cm = _compile(model, method, tau, calib_path, args.alpha)
            t0 = time.perf_counter()
            with shadow_errors() as errors:
                out = _run(cm, labels, seeds, args.steps)
            st = fc.stats(cm)
            total = st["blocks_computed"] + st["blocks_skipped"]
            errs = [e for _, e in errors]
            row = {
                "method": method,
                "tau": tau,
                "psnr": psnr(out, ref),
                "skipped": st["blocks_skipped"] / total,
                "audit": {
                    "skips": len(errs),
                    "violations": sum(e > tau for e in errs),
                    "violation_rate": sum(e > tau for e in errs) / len(errs) if errs else 0.0,
                    "max_error": max(errs, default=0.0),
                    "mean_error": sum(errs) / len(errs) if errs else 0.0,
                },
                "wall_s": time.perf_counter() - t0,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "command": "python -m benchmarks.forecast_study " + " ".join(argv or []),
        "model": "old reference DiT (benchmarks/reference/dit-fmnist), DDIM, guidance 3, cfg=batch",
        "samples": args.samples,
        "steps": args.steps,
        "alpha": args.alpha,
        "calibration": {"generations": args.generations, "batch": 8, "wall_s": calib_s, **calib.metrics},
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "forecast_study.json").write_text(json.dumps(result, indent=2))
    (OUT / "forecast_study.md").write_text(_markdown(result))
    print((OUT / "forecast_study.md").read_text())


def _markdown(r: dict[str, Any]) -> str:
    c = r["calibration"]
    lines = [
        "# Fitted multi-step forecaster and conformal skip rule (old reference DiT)",
        "",
        f"{r['model']}; {r['samples']} samples, {r['steps']} steps, eager lowering, 1 torch thread; "
        f"α = {r['alpha']}. Calibration: {c['generations']} generations of 8 samples (seeds 1000+), every "
        "second one held out.",
        "",
        "## Held-out one-block relative error of the forecaster",
        "",
        f"Mean of ‖ŷ − y‖/‖y‖ (worst output) over every step and gap pattern with gaps ≤ {c['forecast_max_gap']} "
        f"that a 3-step history allows ({c['forecast_heldout_forecasts']} forecasts on held-out generations, "
        "the same forecasts for every K). fixed: polynomial extrapolation weights (TaylorSeer-like, true "
        "step spacing); fitted: least squares per block and gap pattern.",
        "",
        "| K | fitted | fixed |",
        "|---|---|---|",
    ]
    s = c["forecast_heldout_rel_error"]
    for k in (1, 2, 3):
        lines.append(f"| {k} | {s[f'fitted_k{k}']:.4f} | {s[f'fixed_k{k}']:.4f} |")
    lines += [
        "",
        f"Chosen order: K = {c['forecast_order']}. For scale, the existing forms' held-out error (1–3 step "
        "skips, another example set): " + ", ".join(f"{k} {v:.4f}" for k, v in c["heldout_rel_error"].items()) + ".",
        "",
        "## End to end",
        "",
        "skipped: share of block executions skipped. Audit: every skipped block also computed on its actual "
        "input; violation = relative output error > τ (for the χ² rows τ is an input tolerance, so the "
        "rate only says how far that rule is from bounding the output error).",
        "",
        "| method | τ | skipped | PSNR dB | audited skips | violations | rate | max err | mean err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        a = row["audit"]
        lines.append(
            f"| {row['method']} | {row['tau']} | {row['skipped']:.1%} | {row['psnr']:.2f} | {a['skips']} | "
            f"{a['violations']} | {a['violation_rate']:.1%} | {a['max_error']:.3f} | {a['mean_error']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
