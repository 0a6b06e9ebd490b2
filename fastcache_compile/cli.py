"""The ``fastcache`` command line: runs from any directory, needs nothing outside the installed package.

    fastcache generate --model reference --n 8 --steps 20 --threshold 0.1 --out samples/
    fastcache calibrate --model reference --out calibration.safetensors
    fastcache bench --model reference --threshold 0.1
    fastcache export --format onnx --model reference --out out/mmdit --threshold 0.1

``--model`` is ``reference`` (the shipped flow-matching MMDiT), a reference-format folder, or
``module:factory`` found from the current directory; see ``_cli_models`` for what each must hold.
``generate`` / ``bench`` compare the sampler with and without ``torch.compile(backend="fastcache")`` on
the same seeds, after one warm-up generation each, and report wall and process CPU time.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._cli_common import _cache_options, _compiled, _options, _sampler, _sampling_options, _say, _warm
from ._cli_models import load_model, psnr, reference_inputs, require_reference, timed


def _generate(args: argparse.Namespace) -> int:
    import fastcache_compile

    from ._png import write_png

    _options(args, None)  # bad option values fail before the model loads
    ref = require_reference(load_model(args.model), "generate")
    run, steps = _sampler(args, ref)
    options = _options(args, steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = _say(time.perf_counter())
    say(f"warm-up: {args.n} images, lowering {options.get('lowering')}")
    compiled = _compiled(ref, options)
    _warm(run, ref.transformer, steps, args.warmup_steps)
    _warm(run, compiled, steps, args.warmup_steps)
    fastcache_compile.reset(compiled)
    say(f"sampling {args.n} images × {steps} steps, without and with the cache")
    plain, wall_0, cpu_0 = timed(lambda: run(ref.transformer))
    cached, wall_1, cpu_1 = timed(lambda: run(compiled))
    s = fastcache_compile.stats(compiled)
    write_png(out / "uncached.png", plain)
    write_png(out / "fastcache.png", cached)
    result = {
        "model": args.model,
        "n": args.n,
        "steps": steps,
        "options": options,
        "uncached": {"wall_s": wall_0, "cpu_s": cpu_0},
        "fastcache": {"wall_s": wall_1, "cpu_s": cpu_1},
        "psnr_db": psnr(cached, plain),
        "max_abs_diff": float((cached - plain).abs().max()),
        "stats": {k: v for k, v in s.items() if k != "tokens_per_call"},
    }
    (out / "generate.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"blocks skipped: {s['blocks_skipped']} of {s['blocks_skipped'] + s['blocks_computed']}", end="")
    print(f" ({100 * s['skip_ratio']:.1f} %), calls {s['calls']}, generations {s['generations']}")
    print(f"uncached:  wall {wall_0:.2f} s, CPU {cpu_0:.2f} s")
    print(f"fastcache: wall {wall_1:.2f} s, CPU {cpu_1:.2f} s")
    print(f"speed-up: wall {wall_0 / wall_1:.2f}x, CPU {cpu_0 / cpu_1:.2f}x", end="")
    print(f"; PSNR vs uncached {result['psnr_db']:.1f} dB")
    print(f"wrote {out / 'uncached.png'}, {out / 'fastcache.png'}, {out / 'generate.json'}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import fastcache_compile

    try:
        orders = tuple(int(k) for k in args.forecast_orders.split(","))
    except ValueError:
        raise ValueError(
            f"--forecast-orders takes comma-separated orders such as 3 or 1,2,3, got {args.forecast_orders!r}"
        ) from None
    ref = require_reference(load_model(args.model), "calibrate")
    run, steps = _sampler(args, ref)
    if args.generations < 1:
        raise ValueError(f"--generations must be >= 1, got {args.generations}")
    say = _say(time.perf_counter())
    say(f"calibrating on {args.generations} generations of {args.n} images × {steps} steps")

    def drive(model: Any, first: int = args.seed) -> None:
        for g in range(args.generations):
            run(model, seed=first + g * args.n)

    # drift pass: the same number of generations on other seeds, cached at the given τ
    drift = None if args.drift_threshold is None else {"threshold": args.drift_threshold, "num_steps": steps}
    again = functools.partial(drive, first=args.seed + 10_000)
    calib = fastcache_compile.calibrate(
        ref.transformer, drive, args.out, drift=drift, drift_run=again,
        forecast_orders=orders, forecast_max_gap=args.forecast_max_gap,
    )  # fmt: skip
    metrics = calib.metrics
    print(f"recommended approximation: {calib.recommended}")
    for form, err in sorted(metrics.get("heldout_rel_error", {}).items(), key=lambda kv: kv[1]):
        print(f"  {form:10s} held-out relative error {err:.4f}")
    print("beta per block: " + ", ".join(f"{b:.2f}" for b in metrics.get("beta", [])))
    print(f"wrote {args.out}; use it with --calibration {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import fastcache_compile

    _options(args, None)  # bad option values fail before the model loads
    ref = require_reference(load_model(args.model), "bench")
    run, steps = _sampler(args, ref)
    options = _options(args, steps)
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    say = _say(time.perf_counter())
    models: list[tuple[str, Any]] = [("uncached eager", ref.transformer)]
    if options["lowering"] == "inductor":
        models.append(("uncached inductor", torch.compile(ref.transformer)))
    models.append((f"fastcache τ={args.threshold:g} ({options['lowering']})", _compiled(ref, options)))
    rows, baseline = [], None
    for name, model in models:
        say(f"{name}: warm-up, then {args.repeats} generations of {args.n} images × {steps} steps")
        _warm(run, model, steps, args.warmup_steps)
        if name.startswith("fastcache"):
            fastcache_compile.reset(model)
        runs = [timed(lambda m=model: run(m)) for _ in range(args.repeats)]
        images = runs[0][0]
        baseline = images if baseline is None else baseline
        row = {
            "method": name,
            "wall_s": statistics.median(r[1] for r in runs),
            "cpu_s": statistics.median(r[2] for r in runs),
            "psnr_db": psnr(images, baseline),
        }
        if name.startswith("fastcache"):
            row["skip_ratio"] = fastcache_compile.stats(model)["skip_ratio"]
        rows.append(row)
    print(f"{args.n} images × {steps} steps, cfg {args.cfg}, median of {args.repeats} after one warm-up")
    print("| method | wall s | CPU s | wall speed-up | CPU speed-up | blocks skipped | PSNR vs eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        skipped = f"{100 * r['skip_ratio']:.1f} %" if "skip_ratio" in r else "0 %"
        print(
            f"| {r['method']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {rows[0]['wall_s'] / r['wall_s']:.2f}x | "
            f"{rows[0]['cpu_s'] / r['cpu_s']:.2f}x | {skipped} | {r['psnr_db']:.1f} dB |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "steps": steps, "options": options, "rows": rows}) + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import build_segment_engines, export_onnx, export_segments, export_tensorrt
    from .export.tensorrt import _import_tensorrt

    say = _say(time.perf_counter())
    # TensorRT takes the segment layout by default: its If conditional fails on an Attention node inside
    layout = args.layout or ("segments" if args.format == "tensorrt" else "if")
    if args.format == "tensorrt":
        _import_tensorrt()  # fail before the (slow) ONNX export, not after it
        if layout == "if":
            say("warning: TensorRT from the If layout is experimental (TensorRT 10.16 fails on Attention in If)")
    options = _options(args, None)
    say(f"loading model {args.model!r}")
    loaded = load_model(args.model)
    if isinstance(loaded, tuple):
        model, example = loaded
    else:  # --batch applies to reference models: one exported signature per batch size
        model, example = loaded.transformer, [reference_inputs(loaded, b) for b in args.batch]
    export = export_segments if layout == "segments" else export_onnx
    out = export(model, example, args.out, progress=say, verify=not args.no_verify, **options)
    if args.format == "tensorrt" and layout == "segments":
        build_segment_engines(out, out, progress=say)  # strongly typed: precision from the exported dtypes
    elif args.format == "tensorrt":
        export_tensorrt(out, out, fp16=args.fp16, progress=say)
    say(f"done: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastcache", description="FastCache for Diffusion Transformers")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "'reference', a reference-format folder, or 'module:factory' (from the current directory)"

    gen = commands.add_parser("generate", help="sample with and without the cache, write PNG grids")
    gen.add_argument("--model", default="reference", help=model_help)
    gen.add_argument("--out", required=True, help="output directory (PNG grids, generate.json)")
    _sampling_options(gen, n=8, seed=0)
    _cache_options(gen)

    cal = commands.add_parser("calibrate", help="fit the skip-path maps on a few full generations")
    cal.add_argument("--model", default="reference", help=model_help)
    cal.add_argument("--out", required=True, help="calibration file to write (safetensors)")
    cal.add_argument("--generations", type=int, default=4, help="generations to fit on (every 4th is held out)")
    cal.add_argument("--drift-threshold", type=float, help="also record forecaster skips cached at this τ")
    cal.add_argument("--forecast-orders", default="1,2,3", help="forecaster orders K to compare, e.g. 2 or 1,2,3")
    cal.add_argument("--forecast-max-gap", type=int, default=4, help="largest step gap of the forecaster's table")
    _sampling_options(cal, n=2, seed=1000)  # seeds apart from generate's, so its images are held out

    bench = commands.add_parser("bench", help="timing table: uncached vs fastcache, after warm-up")
    bench.add_argument("--model", default="reference", help=model_help)
    bench.add_argument("--repeats", type=int, default=3, help="timed generations per method (median)")
    bench.add_argument("--json", default=None, help="also write the raw numbers to this file")
    _sampling_options(bench, n=4, seed=0)
    _cache_options(bench)

    exp = commands.add_parser("export", help="export the cache-rewritten model for deployment")
    exp.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx")
    exp.add_argument(
        "--layout",
        choices=("if", "segments"),
        default=None,
        help="'if': one graph with ONNX If per block (ONNX Runtime); 'segments': one graph per static segment, "
        "decided on the host (default for --format tensorrt)",
    )
    exp.add_argument("--model", required=True, help=model_help + "; a factory may return (model, kwargs)")
    exp.add_argument("--out", required=True, help="output directory")
    _cache_options(exp, lowering=False)
    exp.add_argument("--batch", type=int, nargs="+", default=[2], help="reference model batch sizes to export")
    exp.add_argument("--fp16", action="store_true", help="TensorRT: allow fp16 kernels")
    exp.add_argument("--no-verify", action="store_true", help="skip running the graphs under ONNX Runtime")
    return parser


_COMMANDS = {"generate": _generate, "calibrate": _calibrate, "bench": _bench, "export": _export}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, ImportError, FileNotFoundError) as err:
        print(f"fastcache: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
