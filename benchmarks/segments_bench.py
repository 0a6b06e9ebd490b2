"""Host-dispatch overhead of the segment lowering against the in-graph cond form, on CPU.

    python -m benchmarks.segments_bench [--repeats 30]

Both forms are built from one captured graph of a random hand-written DiT and called with the same
inputs and state: a *miss* step (every block forced to compute) and a *hit* step (τ = 10, every block
takes the predictor). Each row is warmed up (lazy Inductor compiles happen there), then timed
``--repeats`` times; the table gives the median per call and segments / cond. Eager and Inductor are
measured in one process. Writes ``benchmarks/results/segments.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fastcache_compile.backend import _outlined
from fastcache_compile.export._capture import capture
from fastcache_compile.passes import insert_cache, insert_recording
from fastcache_compile.passes.segments import split_segments
from fastcache_compile.segments import SegmentRunner, eager, inductor

RESULTS = Path(__file__).parent / "results"
MODELS = {
    # name: (TinyDiT kwargs, latent size); 16 tokens shows the dispatch cost, 256 tokens a real step
    "tiny-16tok-4blk": ({"input_size": 8, "dim": 64, "depth": 4, "heads": 4}, 8),
    "small-256tok-8blk": ({"input_size": 32, "dim": 128, "depth": 8, "heads": 4}, 32),
}


def _model(kwargs: dict[str, Any]) -> torch.nn.Module:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import TinyDiT

    torch.manual_seed(0)
    return TinyDiT(**kwargs).eval()


def _time(fn, args: list[Any], repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _bench(name: str, kwargs: dict[str, Any], size: int, repeats: int, lowerings: list[str]) -> list[dict[str, Any]]:
    model = _model(kwargs)
    inputs = {"x": torch.randn(2, 4, size, size), "t": torch.tensor([500, 500]), "y": torch.tensor([1, 2])}
    gm, args, _ = capture(model, inputs)
    init = insert_recording(_outlined(gm, args))
    n_out = 1
    with torch.no_grad():
        state = list(init(*args, torch.tensor(0.0))[n_out:-1])
    pos = next(i for i, a in enumerate(args) if a is inputs["x"])
    x2 = args[pos] + 1e-3 * torch.randn_like(args[pos])  # a small move: τ = 10 skips every block
    rows = []
    for lowering in lowerings:
        for kind, force in (("miss", True), ("hit", False)):
            cond_gm = insert_cache(_outlined(gm, args), 10.0, 0.05)
            runner = SegmentRunner(
                split_segments(_outlined(gm, args), 10.0, 0.05), eager if lowering == "eager" else inductor
            )
            call = [*args[:pos], x2, *args[pos + 1 :], *state, torch.tensor(5.0), torch.tensor(force)]
            t0 = time.perf_counter()
            if lowering == "inductor":
                from torch._inductor.compile_fx import compile_fx

                cond_fn = compile_fx(cond_gm, call)
                with torch.no_grad():
                    cond_fn(*call)
            else:
                cond_fn = cond_gm
            cond_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                runner(*call)
            seg_compile = time.perf_counter() - t0
            with torch.no_grad():
                assert bool(cond_fn(*call)[-1].all()) == force  # the step really is a miss / a hit
            ms_cond, ms_seg = _time(cond_fn, call, repeats), _time(runner, call, repeats)
            rows.append(
                {
                    "model": name,
                    "blocks": kwargs["depth"],
                    "tokens": (size // 2) ** 2,
                    "lowering": lowering,
                    "step": kind,
                    "cond_ms": round(ms_cond, 3),
                    "segments_ms": round(ms_seg, 3),
                    "ratio": round(ms_seg / ms_cond, 3),
                    "overhead_ms_per_block": round((ms_seg - ms_cond) / kwargs["depth"], 4),
                    "first_call_s": {"cond": round(cond_compile, 2), "segments": round(seg_compile, 2)},
                }
            )
            print(rows[-1], flush=True)
            torch._dynamo.reset()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lowerings", nargs="*", default=["eager", "inductor"], choices=["eager", "inductor"])
    args = parser.parse_args(argv)
    rows = [r for name in args.models for r in _bench(name, *MODELS[name], args.repeats, args.lowerings)]
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "batch": 2,
        "load_average_1min": round(os.getloadavg()[0], 1),  # a shared machine: read the ratios, not the ms
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "segments.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Segment lowering: host-dispatch overhead (CPU)",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, batch 2, median of {args.repeats} calls per row. "
        "miss = every block computes (forced), hit = every block predicted (τ = 10, reuse). "
        f"1-minute load average {meta['load_average_1min']} on {os.cpu_count()} cores: with a shared machine the "
        "absolute times are contention, compare within a row.",
        "",
        "| model | lowering | step | cond ms | segments ms | segments / cond | overhead ms / block |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['lowering']} | {r['step']} | {r['cond_ms']:.2f} | {r['segments_ms']:.2f} "
            f"| {r['ratio']:.2f} | {r['overhead_ms_per_block']:.3f} |"
        )
    (RESULTS / "segments.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
