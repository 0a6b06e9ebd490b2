"""First benchmark of the transformer-level cache: latency, error and block work skipped.

    python -m benchmarks.block_cache [--steps 20] [--repeats 3]

Models (random weights, so only relative error and speed are meaningful here; quality on a trained
model is measured by ``benchmarks.compare``):
  * ``dit``: diffusers ``DiTTransformer2DModel`` shaped like DiT-XL/2 but smaller (patch 2 on a 4×16×16
    latent = 64 tokens, hidden 384, 12 blocks),
  * ``handwritten``: the DiT-paper-style model of the test-suite at the same size.
Methods, in one process: uncached eager, uncached Inductor, fastcache (Inductor) at several τ.
Each is warmed up (one full generation, which includes compilation) and then timed over repeats.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import fastcache_compile as fc

RESULTS = Path(__file__).parent / "results"
TAUS = (0.05, 0.1, 0.2, 0.3)


def build_dit() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=1,
    ).eval()


def build_handwritten() -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from models import TinyDiT

    torch.manual_seed(0)
    return TinyDiT(input_size=16, patch=2, in_channels=4, dim=384, depth=12, heads=6).eval()


def sample(model, steps: int, batch: int = 2, seed: int = 0, guidance: float = 3.0) -> torch.Tensor:
    """Euler loop over ints 999 → 0 with batched classifier-free guidance (null class 10)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    y = torch.cat([labels, torch.full_like(labels, 10)])
    sig = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for s, s_next in itertools.pairwise(sig):
            t = torch.full((2 * batch,), round(999 * float(s)), dtype=torch.long)
            out = model(torch.cat([x, x]), t, y)
            out = out.sample if hasattr(out, "sample") else out
            cond, uncond = out.chunk(2)
            x = x + (s_next - s) * (uncond + guidance * (cond - uncond))
    return x


def _time(fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()  # warm-up: compiles
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first, out


def run_model(name: str, model: torch.nn.Module, steps: int, repeats: int) -> list[dict]:
    rows = []
    lat_eager, _, ref = _time(lambda: sample(model, steps), repeats)
    rows.append({"model": name, "method": "uncached", "lowering": "eager", "tau": None, "latency_s": lat_eager})
    torch._dynamo.reset()
    ind = torch.compile(model)
    lat_ind, first, out = _time(lambda: sample(ind, steps), repeats)
    rows.append(
        {
            "model": name,
            "method": "uncached",
            "lowering": "inductor",
            "tau": None,
            "latency_s": lat_ind,
            "compile_s": first - lat_ind,
            "rel_err": float((out - ref).norm() / ref.norm()),
        }
    )
    for tau in TAUS:
        torch._dynamo.reset()
        cm = torch.compile(model, backend="fastcache", options={"threshold": tau}, fullgraph=True)
        lat, first, out = _time(lambda cm=cm: sample(cm, steps), repeats)
        st = fc.stats(cm)
        rows.append(
            {
                "model": name,
                "method": "fastcache",
                "lowering": "inductor",
                "tau": tau,
                "latency_s": lat,
                "compile_s": first - lat,
                "rel_err": float((out - ref).norm() / ref.norm()),
                # every block of these models costs the same, so the skipped share of block FLOPs
                # is the skipped share of block executions
                "flops_skipped": st["skip_ratio"],
                "compiled_variants": st["compiled_variants"],
            }
        )
    for row in rows:
        row["speedup_vs_eager"] = lat_eager / row["latency_s"]
        row["speedup_vs_inductor"] = lat_ind / row["latency_s"]
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    head = "| model | method | lowering | τ | latency s | × eager | × inductor | rel. error | block FLOPs skipped |"
    lines = [
        "# Transformer-level cache: latency and error (random weights)",
        "",
        f"{meta['steps']} Euler steps, batch 2 with batched CFG (4 rows), median of {meta['repeats']} runs after"
        f" a warm-up; torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}.",
        "",
        head,
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tau = "" if r["tau"] is None else f"{r['tau']:g}"
        err = f"{r['rel_err']:.4f}" if "rel_err" in r else "0 (reference)"
        skipped = f"{r['flops_skipped']:.1%}" if "flops_skipped" in r else "0%"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['lowering']} | {tau} | {r['latency_s']:.3f} | "
            f"{r['speedup_vs_eager']:.2f} | {r['speedup_vs_inductor']:.2f} | {err} | {skipped} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadiest timings on a small shared machine)"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    meta = {
        "steps": args.steps,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    rows = []
    for name, build in (("dit", build_dit), ("handwritten", build_handwritten)):
        rows += run_model(name, build(), args.steps, args.repeats)
        print(to_markdown(rows, meta), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block_cache.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "block_cache.md").write_text(to_markdown(rows, meta))
    print(f"wrote {args.out / 'block_cache.json'} and block_cache.md")


if __name__ == "__main__":
    main()
