"""Where token selection and token merging pay: block-level caching vs. token selection vs. both.

Models: the shipped reference DiT at its trained 32×32 (64 tokens) and at 64×64 (256 tokens; sin-cos
positions are recomputed, quality is judged against the same model's full computation), and a
random-weight DiT-S-sized diffusers ``DiTTransformer2DModel`` at 256 tokens (relative error and
compute saved only). Every row samples the same seeds (CFG batch, DDIM) in one process; Inductor
lowering, one torch thread.

Reported per row: relative L2 and PSNR of the final images against uncached eager; the share of
token-block work that ran (``fastcache_compile.stats(...)["work_fraction"]``: a block run on k of N
tokens counts k/N; attention shrinks quadratically, so compute saved is at least 1 − work); latency
ratio against uncached Inductor; compile time (warm-up generation minus a steady one); tokens per
call.

    python -m benchmarks.token_select            # ~40 min at one thread
    python -m benchmarks.token_select --quick    # 10 steps, fewer rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

import fastcache_compile
from benchmarks.metrics import psnr, rel_l2
from benchmarks.reference.calibrate import CALIBRATION_FILE as SHIPPED_CALIBRATION
from benchmarks.reference.pipeline import load_reference, sample

OUT = Path(__file__).parent / "results"
LABELS = torch.tensor([0, 3])  # two samples, CFG batch of 4


def _dit_s() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DiTTransformer2DModel(
            num_attention_heads=6,
            attention_head_dim=64,
            in_channels=1,
            out_channels=1,
            num_layers=12,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=10,
            norm_num_groups=1,
        )
    return model.eval().requires_grad_(False)


MODELS = {
    "reference DiT, 64 tokens": (load_reference, 32),
    "reference DiT, 256 tokens": (load_reference, 64),
    "random DiT-S, 256 tokens": (_dit_s, 32),
}


def settings(quick: bool) -> list[tuple[str, str, dict[str, Any]]]:
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for tau in (0.02, 0.03, 0.05, 0.1) if not quick else (0.05,):
        rows.append(("block", f"τ={tau:g}", {"threshold": tau}))
    for theta in (0.03, 0.05, 0.1) if not quick else (0.1,):
        rows.append(("tokens", f"θ={theta:g}", {"threshold": 0.0, "token_select": True, "token_threshold": theta}))
    for tau, theta in ((0.03, 0.05),) if not quick else ():
        both = {"threshold": tau, "token_select": True, "token_threshold": theta}
        rows.append(("tokens+block", f"τ={tau:g} θ={theta:g}", both))
    for theta in (0.05,) if not quick else (0.1,):
        merge = {"token_select": True, "token_threshold": theta, "token_merge": True, "merge_ratio": 0.5}
        rows.append(("tokens+merge", f"θ={theta:g} r=0.5", {"threshold": 0.0, **merge}))
    return rows


def _calibration(name: str, model: torch.nn.Module, size: int, steps: int, out: Path) -> Path:
    """The shipped calibration at the reference model's trained size; otherwise a fresh one (seeds
    disjoint from the rows; at 64×64 the recomputed position table changes the model's fingerprint).
    Every row then uses the fitted forms (approximation "auto")."""
    if name == "reference DiT, 64 tokens":
        return SHIPPED_CALIBRATION
    slug = "".join(c if c.isalnum() else "_" for c in name)
    path = Path(tempfile.gettempdir()) / f"fastcache_token_select_{slug}.safetensors"

    def run(m: Any) -> None:
        for g in range(3):
            sample(m, LABELS, seed=1000 + 10 * g, steps=steps, size=size)

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastcache_compile.calibrate(model, run, path)
    return path


def _run(model: Any, size: int, steps: int, seed: int) -> torch.Tensor:
    return sample(model, LABELS, seed=seed, steps=steps, size=size)


def bench_model(name: str, steps: int, lowering: str, quick: bool, out: Path) -> list[dict[str, Any]]:
    build, size = MODELS[name]
    model = build()
    calibration = _calibration(name, model, size, steps, out)
    ref = _run(model, size, steps, 0)  # uncached eager
    rows: list[dict[str, Any]] = []
    base: dict[str, Any] = {}
    plan = [("none", "-", None), *settings(quick)]
    for method, setting, opts in plan:
        torch._dynamo.reset()
        if opts is None:
            compiled = torch.compile(model)
        else:
            options = {"num_steps": steps, "warmup_steps": 2, "lowering": lowering, **opts}
            options["calibration"] = str(calibration)
            compiled = torch.compile(model, backend="fastcache", options=options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            _run(compiled, size, steps, 1)  # warm-up generation: compiles every variant
            warm = time.perf_counter() - t0
            if opts is not None:
                fastcache_compile.reset(compiled)
            t0, c0 = time.perf_counter(), time.process_time()
            out = _run(compiled, size, steps, 0)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        row: dict[str, Any] = {"model": name, "method": method, "setting": setting, "options": opts}
        row.update(latency_s=wall, cpu_s=cpu, compile_s=max(0.0, warm - wall))
        row.update(rel_l2=rel_l2(out, ref), psnr=psnr(out, ref))
        if opts is not None:
            st = fastcache_compile.stats(compiled)
            row.update(work_fraction=st["work_fraction"], skip_ratio=st["skip_ratio"])
            if "tokens_per_call" in st:
                row["num_tokens"] = st["num_tokens"]
                row["tokens_per_call"] = dict(sorted(Counter(st["tokens_per_call"]).items()))
        else:
            row["work_fraction"] = 1.0
            base = row
        rows.append(row)
        print(
            f"  {name} | {method} {setting}: {wall:.2f} s, work {row['work_fraction']:.2f}, "
            f"rel L2 {row['rel_l2']:.4f}, compile {row['compile_s']:.1f} s",
            flush=True,
        )
    for row in rows:
        row["speedup"] = base["latency_s"] / row["latency_s"]
        row["speedup_cpu"] = base["cpu_s"] / row["cpu_s"]
    torch._dynamo.reset()
    return rows


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_select.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Token selection and merging vs. block-level caching",
        "",
        f"{meta['steps']} DDIM steps, 2 samples with CFG (batch 4), lowering {meta['lowering']}, "
        f"{meta['threads']} torch thread, {meta['cpu']}. Quality against uncached eager on the same seeds.",
        "work: share of token-block work that ran (a block on k of N tokens counts k/N). "
        "speedup: latency vs. uncached Inductor in the same run; CPU: the same from process CPU time. "
        "compile: warm-up generation minus a steady one. θ = token_threshold, r = merge_ratio. Every "
        "row uses the fitted forms (calibration; approximation auto), also for the static tokens (W_s).",
        "",
        "| model | method | setting | work | speedup | speedup (CPU) | rel L2 | PSNR dB | compile s | tokens per call "
        "|",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tokens = ", ".join(f"{k}×{v}" for k, v in r.get("tokens_per_call", {}).items()) or "–"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['setting']} | {r['work_fraction']:.2f} | {r['speedup']:.2f}x | "
            f"{r['speedup_cpu']:.2f}x | {r['rel_l2']:.4f} | {r['psnr']:.1f} | {r['compile_s']:.1f} | {tokens} |"
        )
    (out / "token_select.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "token_select.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per model: relative L2 against the work that ran (top) and PSNR against the CPU-time speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 8), squeeze=False)
    panels = (("work_fraction", "rel_l2", "work that ran (fraction)", "rel L2 vs uncached", True),
              ("speedup_cpu", "psnr", "speed-up vs uncached Inductor (CPU time)", "PSNR dB", False))  # fmt: skip
    for row_axes, (xkey, ykey, xlabel, ylabel, logy) in zip(axes, panels):
        for ax, name in zip(row_axes, models):
            for method, marker in (("block", "o-"), ("tokens", "s-"), ("tokens+block", "^"), ("tokens+merge", "D")):
                pts = sorted((r for r in rows if r["model"] == name and r["method"] == method), key=lambda r: r[xkey])
                if pts:
                    ys = [max(r[ykey], 1e-4) for r in pts]
                    ax.plot([r[xkey] for r in pts], ys, marker, label=method)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if logy:
                ax.set_yscale("log")
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 steps and fewer settings (a smoke run)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lowering", choices=("inductor", "eager"), default="inductor")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (10 if args.quick else 50)
    out = args.out or (OUT / "quick" if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        rows += bench_model(name, steps, args.lowering, args.quick, out)
    meta = {
        "steps": steps,
        "threads": args.threads,
        "lowering": args.lowering,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_avg_end": os.getloadavg(),
        "wall_s": time.perf_counter() - start,
        "log2_tokens": {r["model"]: math.log2(r["num_tokens"]) for r in rows if "num_tokens" in r},
    }
    write(rows, meta, out)
    print((out / "token_select.md").read_text())


if __name__ == "__main__":
    main()
