"""Refresh policy study: does a cap on consecutive skips, or a synchronised refresh, buy dB at equal work?

    python -m benchmarks.refresh_study [--samples 32] [--batch 16]

On the reference MMDiT (20 steps, batched CFG, eager lowering, one torch thread), for the fitted
forecaster (shipped calibration) and plain reuse, a τ sweep per refresh policy:

- ``none``: the skip rule alone (the forecaster's weight table still caps its gaps at its max gap);
- ``max_skips=M``: a block computes once its last compute is more than M steps back;
- ``refresh_every=N``: every N-th step computes all blocks (FORA / TaylorSeer style).

Each row: share of block executions skipped (the work measure) and PSNR against uncached samples of
the same seeds. The table then reads each policy's PSNR at equal work by linear interpolation of its
(skipped, PSNR) points. Writes benchmarks/results/refresh_study.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastcache_compile as fc
from benchmarks import subjects
from benchmarks.metrics import psnr

OUT = Path(__file__).resolve().parent / "results"
POLICIES: dict[str, dict[str, int]] = {
    "none": {},
    "max_skips=2": {"max_skips": 2},
    "max_skips=3": {"max_skips": 3},
    "refresh_every=3": {"refresh_every": 3},
    "refresh_every=4": {"refresh_every": 4},
}
TAUS = {"forecast": (0.1, 0.2, 0.3, 0.4), "reuse": (0.05, 0.1, 0.2, 0.3)}
WORK = (0.4, 0.5, 0.6, 0.7)  # shares of block work skipped at which policies are compared


def generate(subject: Any, model: Any, labels: torch.Tensor, seeds: list[int], batch: int) -> torch.Tensor:
    """Samples at the subject's default steps and guidance, batched CFG, ``batch`` samples per call."""
    outs = []
    for i in range(0, len(seeds), batch):
        outs.append(
            subject.generate(
                model, labels[i : i + batch], seeds[i : i + batch], subject.steps, subject.guidance, "batch"
            )
        )
    return torch.cat(outs)


def measure(
    subject: Any, options: dict[str, Any], labels: torch.Tensor, seeds: list[int], batch: int, ref: torch.Tensor
) -> tuple[float, float, dict[str, Any]]:
    """A fresh fastcache compile with ``options`` sampled on ``seeds``: (share of block executions
    skipped, PSNR against ``ref``, ``fastcache_compile.stats``)."""
    torch._dynamo.reset()
    cm = torch.compile(subject.transformer, backend="fastcache", options=options)
    out = generate(subject, cm, labels, seeds, batch)
    st = fc.stats(cm)
    return st["blocks_skipped"] / (st["blocks_skipped"] + st["blocks_computed"]), psnr(out, ref), st


def _at_work(points: list[tuple[float, float]], work: float) -> float | None:
    """PSNR at ``work`` skipped, interpolated between the sweep's points; None outside their range."""
    pts = sorted(points)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs or work < xs[0] or work > xs[-1]:
        return None
    return float(np.interp(work, xs, ys))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    subject = subjects.load("new")
    seeds = list(range(5000, 5000 + args.samples))  # not the calibration's seeds
    labels = torch.arange(args.samples) % 10
    start = time.perf_counter()
    ref = generate(subject, subject.transformer, labels, seeds, args.batch)
    rows = []
    for form, taus in TAUS.items():
        for policy, extra in POLICIES.items():
            for tau in taus:
                options = {"lowering": "eager", "threshold": tau, "approximation": form, **extra}
                if form != "reuse":
                    options["calibration"] = str(subject.calibration)
                skipped, quality, _ = measure(subject, options, labels, seeds, args.batch, ref)
                row = {"form": form, "policy": policy, "tau": tau, "skipped": skipped, "psnr": quality}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "command": "python -m benchmarks.refresh_study " + " ".join(argv or []),
        "model": f"{subject.title}, {subject.regime}",
        "samples": args.samples,
        "steps": subject.steps,
        "seeds": [seeds[0], seeds[-1]],
        "rows": rows,
        "wall_s": time.perf_counter() - start,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "refresh_study.json").write_text(json.dumps(result, indent=2))
    (OUT / "refresh_study.md").write_text(_markdown(result))
    print((OUT / "refresh_study.md").read_text())


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Refresh policy study (reference MMDiT)",
        "",
        f"{r['model']}; {r['samples']} samples (seeds {r['seeds'][0]}–{r['seeds'][1]}), {r['steps']} steps, batched "
        "CFG, eager lowering, 1 torch thread. PSNR vs uncached samples of the same seeds, read at equal work "
        "(share of block executions skipped) by interpolating each policy's τ sweep; – where the sweep does not "
        f"reach that share. Wall time {r['wall_s']:.0f} s.",
        "",
        "| form | policy | " + " | ".join(f"PSNR @ {w:.0%} skipped" for w in WORK) + " |",
        "|---|---|" + "---|" * len(WORK),
    ]
    for form in TAUS:
        for policy in POLICIES:
            pts = [(x["skipped"], x["psnr"]) for x in r["rows"] if x["form"] == form and x["policy"] == policy]
            cells = [_at_work(pts, w) for w in WORK]
            lines.append(f"| {form} | {policy} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells) + " |")
    lines += ["", "## Raw sweep", "", "| form | policy | τ | skipped | PSNR dB |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['form']} | {x['policy']} | {x['tau']} | {x['skipped']:.1%} | {x['psnr']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
