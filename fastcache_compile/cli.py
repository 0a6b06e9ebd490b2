"""The ``fastcache`` command line.

    fastcache export --format onnx --model reference --out out/dit --threshold 0.1
    fastcache export --format tensorrt --model mypkg.models:make --out out/trt --batch 1 2

``--model reference`` is the project's reference DiT (class-conditional, input (B, 1, 32, 32), long
timesteps and labels, null class 10). ``--model module:factory`` calls ``factory()``, which must return
``(model, example_kwargs)``: the model in eval mode and the keyword arguments of one call (or a list of
them, one exported signature each); ``--batch`` applies to the reference model only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

REFERENCE_PATH = "benchmarks/reference/dit-fmnist"
REFERENCE_NULL_CLASS = 10


def _say(start: float) -> Any:
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def load_reference() -> torch.nn.Module:
    """The reference DiT: through ``benchmarks.reference.pipeline`` when importable, else from its folder."""
    try:
        from benchmarks.reference.pipeline import load_reference as load
    except ImportError:
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel.from_pretrained(REFERENCE_PATH, torch_dtype=torch.float32).eval()
    return load()


def reference_inputs(model: torch.nn.Module, batch: int) -> dict[str, Any]:
    """One call of the reference DiT: half conditional, half null-class rows for an even (CFG) batch."""
    cfg = model.config
    labels = torch.zeros(batch, dtype=torch.long)
    if batch % 2 == 0:
        labels[batch // 2 :] = REFERENCE_NULL_CLASS
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
        "timestep": torch.full((batch,), 999, dtype=torch.long),
        "class_labels": labels,
        "return_dict": False,
    }


def _model_and_inputs(spec: str, batches: Sequence[int]) -> tuple[torch.nn.Module, Any]:
    if spec == "reference":
        model = load_reference()
        return model, [reference_inputs(model, b) for b in batches]
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise SystemExit(f"--model must be 'reference' or 'module:factory', got {spec!r}")
    made = getattr(importlib.import_module(module), name)()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise SystemExit(f"{spec}() must return (model, example_kwargs), got {type(made).__name__}")
    return made


def _export(args: argparse.Namespace) -> int:
    from .export import export_onnx, export_tensorrt
    from .export.tensorrt import _import_tensorrt

    say = _say(time.perf_counter())
    if args.format == "tensorrt":
        _import_tensorrt()  # fail before the (slow) ONNX export, not after it
    say(f"loading model {args.model!r}")
    model, example = _model_and_inputs(args.model, args.batch)
    options = {
        "threshold": args.threshold,
        "alpha": args.alpha,
        "warmup_steps": args.warmup_steps,
        "num_steps": args.num_steps,
        "max_streams": args.max_streams,
        "calibration": args.calibration,
        "approximation": args.approximation,
    }
    out = export_onnx(model, example, args.out, progress=say, verify=not args.no_verify, **options)
    if args.format == "tensorrt":
        export_tensorrt(out, out, fp16=args.fp16, progress=say)
    say(f"done: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcache", description="FastCache for Diffusion Transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="export the cache-rewritten model for deployment")
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    exp.add_argument("--model", required=True, help="'reference' or 'module:factory' returning (model, kwargs)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--threshold", type=float, default=0.05, help="τ: tolerated relative RMS input change")
    exp.add_argument("--alpha", type=float, default=0.05, help="significance level of the χ² test")
    exp.add_argument("--warmup-steps", type=int, default=2)
    exp.add_argument("--num-steps", type=int, default=None, help="steps per generation (forces the last)")
    exp.add_argument("--max-streams", type=int, default=4, help="state slots (conditioning streams)")
    exp.add_argument("--calibration", default=None, help="calibration file from fastcache_compile.calibrate")
    exp.add_argument("--approximation", default="auto", choices=("auto", "reuse", "trajectory", "linear", "direct"))
    exp.add_argument("--batch", type=int, nargs="+", default=[2], help="reference model batch sizes to export")
    exp.add_argument("--fp16", action="store_true", help="TensorRT: allow fp16 kernels")
    exp.add_argument("--no-verify", action="store_true", help="skip running the graphs under ONNX Runtime")
    args = parser.parse_args(argv)
    try:
        return _export(args)
    except (ValueError, ImportError) as err:
        print(f"fastcache: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
