"""One-command GPU check of the deployment lowerings; writes JSON, under 8 minutes.

    python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json]

A random hand-written DiT (bf16, 256 tokens, batch 2) is captured once; from that graph it builds
the in-graph cond form (Inductor), the segment program (Inductor per segment), the segment program
with CUDA graphs, and, when installed, torch-tensorrt per segment and TensorRT engines from the ONNX
segment export. Per variant: latency of a *miss* step (every block forced to compute) and a *hit*
step (τ = 10, every block predicted), median after warm-up with the device synchronised; numerics of
the miss step against the uncached eager model and of the hit step against the cond form; first-call
(compile / build) time; engine count. A variant that fails records its error (nothing falls back).
Without CUDA the JSON says why and the script exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

OUT = Path(__file__).parent / "results" / "gpu_check.json"
BUDGET_S = 7 * 60  # stop starting new variants past this


def _versions() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("tensorrt", "torch_tensorrt", "onnx", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # record why, do not stop: these are optional
            info[mod] = f"not available ({type(err).__name__})"
    return info


def _model() -> torch.nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from models import TinyDiT, timestep_embedding

    class BF16DiT(TinyDiT):
        # The test DiT embeds the timestep in float32; cast it to the weights' dtype for bf16.
        def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
            emb = timestep_embedding(t, self.freq_dim).to(x.dtype)
            c = self.t_embedder(emb) + self.y_embedder(y)
            for block in self.blocks:
                x = block(x, c)
            return self.unpatchify(self.final_layer(x, c))

    torch.manual_seed(0)
    # 32×32 latent, patch 2: 256 tokens; 6 blocks of width 384 (DiT-S-like)
    return BF16DiT(input_size=32, patch=2, dim=384, depth=6, heads=6).eval().to("cuda", torch.bfloat16)


def _timed(fn, make_args, repeats: int) -> float:
    times = []
    for i in range(repeats + 3):
        args = make_args()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        if i >= 3:  # warm-up calls are not timed
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def run(repeats: int) -> dict[str, Any]:
    from fastcache_compile.backend import _outlined
    from fastcache_compile.export._capture import capture
    from fastcache_compile.passes import insert_cache, insert_recording
    from fastcache_compile.passes.segments import split_segments
    from fastcache_compile.segments import SegmentRunner, inductor, inductor_cudagraphs

    start = time.perf_counter()
    model = _model()
    kw = {
        "x": torch.randn(2, 4, 32, 32, device="cuda", dtype=torch.bfloat16),
        "t": torch.tensor([500, 500], device="cuda"),
        "y": torch.tensor([1, 2], device="cuda"),
    }
    with torch.no_grad():
        eager_out = model(**kw)
    gm, args, _ = capture(model, kw)
    pos = next(i for i, a in enumerate(args) if a is kw["x"])
    step0 = torch.tensor(0.0, device="cuda")  # step on the device: every segment input is a CUDA tensor
    with torch.no_grad():
        state = list(insert_recording(_outlined(gm, args))(*args, step0)[1:-1])
    x_hit = args[pos] + 1e-3 * torch.randn_like(args[pos])

    def flat(force: bool) -> list[Any]:
        x = args[pos] if force else x_hit
        step = torch.tensor(5.0, device="cuda")
        return [*args[:pos], x, *args[pos + 1 :], *state, step, torch.tensor(force)]

    def cond_form():
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(insert_cache(_outlined(gm, args), 10.0, 0.05), flat(True))

    def segments(lower):
        return lambda: SegmentRunner(split_segments(_outlined(gm, args), 10.0, 0.05), lower)

    variants: dict[str, Any] = {
        "cond_inductor": cond_form,
        "segments_inductor": segments(inductor),
        "segments_cudagraphs": segments(inductor_cudagraphs),
    }
    try:
        from fastcache_compile.export.tensorrt_segments import tensorrt_lowering

        __import__("torch_tensorrt")
        variants["segments_torch_tensorrt"] = segments(tensorrt_lowering)
    except ImportError as err:
        variants["segments_torch_tensorrt"] = str(err)

    results: dict[str, Any] = {}
    reference_hit = None
    for name, factory in variants.items():
        if isinstance(factory, str):
            results[name] = {"skipped": factory}
            continue
        if time.perf_counter() - start > BUDGET_S:
            results[name] = {"skipped": "time budget of the check spent"}
            continue
        row: dict[str, Any] = {}
        try:
            torch._dynamo.reset()
            t0 = time.perf_counter()
            fn = factory()
            with torch.no_grad():
                miss = fn(*flat(True))
                hit = fn(*flat(False))
            torch.cuda.synchronize()
            row["first_calls_s"] = round(time.perf_counter() - t0, 2)
            row["miss_computed"] = miss[-1].tolist()
            row["hit_computed"] = hit[-1].tolist()
            row["miss_rel_l2_vs_eager"] = _rel(miss[0], eager_out)
            if reference_hit is None:
                reference_hit = hit[0].clone()
            row["hit_rel_l2_vs_cond"] = _rel(hit[0], reference_hit)
            graphs = name == "segments_cudagraphs"

            def call(force: bool, fn=fn, graphs=graphs):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # outputs are replay buffers: copied below
                out = fn(*flat(force))
                return [o.clone() for o in out] if graphs else out

            with torch.no_grad():
                row["miss_ms"] = round(_timed(call, lambda: (True,), repeats), 3)
                row["hit_ms"] = round(_timed(call, lambda: (False,), repeats), 3)
            if isinstance(fn, SegmentRunner):
                row["segments"] = len(fn._fns)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
        results[name] = row
        print(name, {k: v for k, v in row.items() if k != "traceback"}, flush=True)

    results["onnx_tensorrt_engines"] = _engines(model, kw, start)
    return {"model": "hand-written DiT, 6 blocks, width 384, 256 tokens, batch 2, bf16", "variants": results}


def _engines(model: torch.nn.Module, kw: dict[str, Any], start: float) -> dict[str, Any]:
    try:
        __import__("tensorrt")
    except ImportError as err:
        return {"skipped": f"tensorrt not installed ({err})"}
    if time.perf_counter() - start > BUDGET_S:
        return {"skipped": "time budget of the check spent"}
    from fastcache_compile.export.segments_onnx import export_segments
    from fastcache_compile.export.tensorrt_segments import build_segment_engines

    try:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            # bf16 graphs: the strongly typed engines take their precision from the exported dtypes
            export_segments(model.cpu(), {k: v.cpu() for k, v in kw.items()}, d, verify=False)
            export_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = build_segment_engines(d, Path(d) / "engines")
            build_s = time.perf_counter() - t0
            manifest = json.loads((out / "manifest.json").read_text())
            return {"export_s": round(export_s, 1), "build_s": round(build_s, 1), **manifest["tensorrt"]}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"versions": _versions()}
    if not torch.cuda.is_available():
        report["skipped"] = "no CUDA device: torch.cuda.is_available() is False (the check needs an NVIDIA GPU)"
    else:
        report.update(run(args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "variants"}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
