"""fastcache under diffusers context parallelism (Ulysses): 1 vs 2 ranks, with and without the cache.

Model: a random-weight ``FluxTransformer2DModel`` (2 double + 2 single blocks, 4 heads of 32) on
256 image and 16 text tokens, one sample, Euler steps from σ = 1 to 0. Ranks are gloo processes on
this CPU, one torch thread each, so 2 ranks use 2 cores where 1 rank uses one: the 2-rank speed-up
here is what context parallelism buys on CPU, not a GPU forecast. Every row samples the same
inputs; one warm-up generation (compile) is discarded, then the median of ``--repeats`` timed
generations is reported. Quality: relative L2 of the final latents against 1-rank uncached.

Rows: ``uncached`` = ``torch.compile(model, backend="eager")`` (the same Dynamo graph, no cache);
``fastcache`` = ``backend="fastcache"`` with eager lowering (Inductor compile times on a loaded
2-core host would dominate a short run).

    python -m benchmarks.parallel            # writes benchmarks/results/parallel.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcache_compile

RESULTS = Path(__file__).parent / "results"
GRID, TXT = 16, 16


def _model() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    return model.eval().requires_grad_(False)


def _inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    cond = {
        "encoder_hidden_states": torch.randn(1, TXT, 32, generator=gen),
        "pooled_projections": torch.randn(1, 16, generator=gen),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(TXT, 3),
    }
    return torch.randn(1, GRID * GRID, 16, generator=gen), cond


def _generate(model: Any, steps: int) -> torch.Tensor:
    x, cond = _inputs()
    sig = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    with torch.no_grad():
        for s, nxt in itertools.pairwise(sig):
            t = torch.full((1,), s, dtype=torch.float32)
            pred = model(hidden_states=x, timestep=t, guidance=None, **cond, return_dict=False)[0]
            x = x + (nxt - s) * pred
    return x


def _rows(model: torch.nn.Module, args: argparse.Namespace, barrier: Any) -> list[dict[str, Any]]:
    rows = []
    for method in ("uncached", "fastcache"):
        torch._dynamo.reset()
        if method == "uncached":
            compiled = torch.compile(model, backend="eager", fullgraph=True)
        else:
            opts = {"lowering": "eager", "threshold": args.threshold, "warmup_steps": 2, "num_steps": args.steps}
            compiled = torch.compile(model, backend="fastcache", options=opts, fullgraph=True)
        t0 = time.perf_counter()
        _generate(compiled, args.steps)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            if method == "fastcache":
                fastcache_compile.reset(compiled)
            barrier()
            t0 = time.perf_counter()
            out = _generate(compiled, args.steps)
            barrier()
            times.append(time.perf_counter() - t0)
        row = {"method": method, "latency_s": statistics.median(times), "times_s": times, "warmup_s": compile_s}
        if method == "fastcache":
            row["skip_ratio"] = fastcache_compile.stats(compiled)["skip_ratio"]
        row["out"] = out
        rows.append(row)
    return rows


def _rank(rank: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    # diffusers 0.42 divides by torch.accelerator.device_count(), which is 0 on a CPU-only host.
    torch.accelerator.device_count = lambda: 1
    from diffusers import ContextParallelConfig

    model = _model()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    rows = _rows(model, args, dist.barrier)
    if rank == 0:
        torch.save(rows, os.path.join(out_dir, "rows.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args()

    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    for row in _rows(_model(), args, lambda: None):
        results.append({"ranks": 1, **row})
    with tempfile.TemporaryDirectory() as tmp:
        # fork: the ranks inherit the imports; nothing has been compiled since the last reset.
        torch._dynamo.reset()
        mp.start_processes(_rank, args=(_free_port(), args, tmp), nprocs=2, start_method="fork")
        results += [{"ranks": 2, **row} for row in torch.load(os.path.join(tmp, "rows.pt"))]

    ref = results[0]["out"]
    base = results[0]["latency_s"]
    for row in results:
        out = row.pop("out")
        row["rel_l2_vs_1rank_uncached"] = float((out - ref).norm() / ref.norm())
        row["speedup_vs_1rank_uncached"] = base / row["latency_s"]
    meta = {
        "model": "random-weight FluxTransformer2DModel, 2+2 blocks, 4x32 heads, 256 image + 16 text tokens",
        "steps": args.steps,
        "repeats": args.repeats,
        "threshold": args.threshold,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "threads_per_rank": 1,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "parallel.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    lines = [
        "# Context parallelism (Ulysses) with and without fastcache, CPU",
        "",
        f"{meta['model']}; {args.steps} Euler steps, τ = {args.threshold}, gloo ranks with one thread each on a "
        f"{meta['cores']}-core host (load average at the end: {meta['load_average_at_end'][0]:.1f}). Median of "
        f"{args.repeats} generations after a warm-up one.",
        "",
        "| ranks | method | latency (s) | speed-up vs 1 rank uncached | blocks skipped | rel. L2 vs 1 rank uncached |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        skip = f"{r['skip_ratio']:.0%}" if "skip_ratio" in r else "–"
        lines.append(
            f"| {r['ranks']} | {r['method']} | {r['latency_s']:.3f} | {r['speedup_vs_1rank_uncached']:.2f}× | "
            f"{skip} | {r['rel_l2_vs_1rank_uncached']:.2e} |"
        )
    (RESULTS / "parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
