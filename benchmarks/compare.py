"""Sweep FastCache, its peers and the cache baselines on the reference models; write one report per model.

    python -m benchmarks.compare --quick              # README demo: new MMDiT, a few minutes, eager only
    python -m benchmarks.compare --small              # per-call overhead: new MMDiT at batch 8, eager only
    python -m benchmarks.compare [--model new|old|both] [--samples N] [--out DIR]

``new`` is the reference MMDiT (rectified flow, Euler, CFG; the primary model); ``old`` the earlier
ε-prediction DDIM DiT, a labelled hard case (see ``benchmarks.subjects``). Each model is loaded once.

Timing is interleaved: every method is set up (own model copy) and warmed up first (for Inductor the
warm-up holds the compile, reported as ``compile_s``); then the timed phase goes batch by batch, and
within each batch over all methods in a rotating order, so load from other jobs on a shared machine
spreads over all methods alike. Process CPU time and wall time are both recorded per batch. Quality is
against the uncached eager samples of the same seeds. Outputs per model: compare.json, compare.md,
pareto_psnr.png, pareto_fid.png, samples_grid.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.utils

from benchmarks import baselines as bl
from benchmarks import diffusers_hooks as dhk
from benchmarks import report, subjects
from benchmarks import step_caches as sc
from benchmarks.cachedit_runs import CacheDit
from benchmarks.compare_env import describe_error, environment
from benchmarks.fastcache_runs import Compiled, bound_violations, ensure_calibration, fastcache_options
from benchmarks.metrics import compute_shares
from benchmarks.plans import PLANS
from benchmarks.reference.fid import real_fid
from benchmarks.sweep import OTHER_SEEDS, WARMUP_STEPS, Bench, quality, speedups, sweep
from fastcache_compile.backend import resolve_form
from fastcache_compile.calibration import load as load_calibration

CFG_STREAMS = {
    "fastcache": "runtime keeps one state slot per conditioning stream, matched by the conditioning inputs",
    "fora / fbc / teacache": "state keyed by the model call's conditioning tensors (and batch shape)",
    "diffusers-*": "diffusers StateManager per cache_context name; PAB: the harness swaps a per-stream state in",
    "cache-dit": "batched CFG is one stream (enable_separate_cfg=False)",
}


def _baselines(bench: Bench, meta: dict[str, Any]) -> list[Any]:
    """Runners for every peer and baseline setting (fits TeaCache's polynomial and MagCache's ratios first)."""
    p, m = bench.plan, bench.subject.transformer
    runners: list[Any] = [sc.Fora(copy.deepcopy(m), n) for n in p.fora]
    runners += [sc.FirstBlockCache(copy.deepcopy(m), t) for t in p.fbc]
    if p.teacache:
        with torch.no_grad():
            fit = sc.fit_teacache(m, bench.other_runs(2, 8))
        meta["teacache_fit"] = fit
        coeffs, span = fit["coefficients"], fit["input_change_range"]
        runners += [sc.TeaCache(copy.deepcopy(m), t, coeffs, p.steps, span) for t in p.teacache]
    runners += [dhk.first_block_cache(m, t) for t in p.diffusers_fbc]
    runners += [dhk.PyramidBroadcast(m, r) for r in p.pab]
    for interval, order, *scope in p.taylorseer:  # scope "blocks": forecast whole blocks, not attention only
        runners.append(dhk.taylorseer(m, interval, order, dhk.whole_blocks(m) if scope == ["blocks"] else None))
    if p.magcache:
        ratios = dhk.calibrate_magcache(m, bench.other_runs(1, 8), p.steps)
        meta["magcache_ratios"] = ratios
        runners += [dhk.magcache(m, t, ratios, p.steps) for t in p.magcache]
    runners += [CacheDit(m, fn, bn, rdt, p.steps, order) for fn, bn, rdt, order in p.cachedit]
    return runners


def _fastcache_runners(bench: Bench, meta: dict[str, Any], calib: Path, alpha: float) -> list[Any]:
    """fastcache rows; fits (or reuses) the calibration first and records it in ``meta``."""
    p, subject = bench.plan, bench.subject
    m = subject.transformer
    inputs = subject.inputs(2)

    def probe(c: Any) -> Any:
        return c(**inputs)

    need_forecast = any(row[0] == "forecast" for row in p.fastcache)
    runs = bench.other_runs(p.calibration_generations, 4)
    fit: dict[str, Any] = {} if p.calibration_max_gap is None else {"forecast_max_gap": p.calibration_max_gap}
    if p.calibration_drift is not None:  # drift pairs on seeds neither the fit nor the rows use
        fit["drift"] = {"num_steps": p.steps, **p.calibration_drift}
        fit["drift_run"] = bench.other_runs(p.calibration_generations, 4, first=OTHER_SEEDS + 500_000)
    meta["calibration"] = ensure_calibration(m, calib, runs, probe, need_forecast, **fit)
    form = resolve_form("auto", load_calibration(calib))
    runners: list[Any] = []
    for approximation, tau, low, *extra in p.fastcache:
        opts = fastcache_options(tau, approximation, low, p.steps, calib, alpha)
        policy = extra[0] if extra else {}  # refresh policy options, e.g. {"max_skips": 2}
        opts.update(policy)
        method = "fastcache" if approximation == "auto" else f"fastcache-{approximation}"
        setting = " ".join([f"τ={tau:g}", *(f"{k}={v}" for k, v in policy.items())])
        runners.append(Compiled(copy.deepcopy(m), method, setting, low, opts))
        runners[-1].notes = f"approximation auto → {form}" if approximation == "auto" else ""
    for tau, theta, merge in p.tokens:
        opts = fastcache_options(tau, "auto", "inductor", p.steps, calib, alpha)
        opts.update(token_select=True, token_threshold=theta, token_merge=merge, merge_ratio=0.5)
        method = "fastcache+tokens+merge" if merge else "fastcache+tokens"
        setting = f"τ={tau:g} θ={theta:g}" + (" r=0.5" if merge else "")
        runners.append(Compiled(copy.deepcopy(m), method, setting, "inductor", opts))
    return runners


def _shadows(bench: Bench, runners: list[Any], rows: list[dict], alpha: float) -> None:
    """Bound violations of the fastcache rows (eager shadow runs; after timing: they reset Dynamo)."""
    done: dict[tuple, tuple[float | None, int]] = {}
    shadow = bench.plan.shadow_samples

    def run(m: Any) -> None:
        bench.batch(m, 0, shadow)

    for runner, row in zip(runners, rows):
        if not (isinstance(runner, Compiled) and runner.is_fastcache) or runner.options.get("token_select"):
            continue  # token rows have no per-block bound to check
        # every option but the lowering steers the decisions (τ, form, refresh policy, calibration)
        key = tuple(sorted((k, str(v)) for k, v in runner.options.items() if k != "lowering"))
        if key not in done:
            try:
                done[key] = bound_violations(runner.base, runner.options, run)
            except Exception as err:  # the shadow run is a measurement; its failure is reported
                done[key] = (None, 0)
                row["notes"] = f"{row.get('notes', '')} shadow run failed: {describe_error(err)}"[:300]
        row["bound_violations"], row["shadow_skips"] = done[key]
        row["alpha"] = alpha


def run_model(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The whole sweep for one model; writes its report into ``out`` and returns the metadata."""
    start = time.perf_counter()
    subject = subjects.load(name, args.checkpoint if name == "new" else None)
    plan = PLANS[(name, _mode(args))]
    over = {k: getattr(args, k) for k in ("samples", "batch", "steps") if getattr(args, k) is not None}
    plan = dataclasses.replace(plan, **over)
    if plan.steps is None or plan.steps < 3:
        raise ValueError(f"--steps must be >= 3, got {plan.steps}")
    guidance = subject.guidance if args.guidance is None else args.guidance
    bench = Bench(subject, plan, guidance, args.cfg, args.seed)
    model = subject.transformer
    inputs = subject.inputs(2 * min(plan.batch, plan.samples))
    shares = compute_shares(model, lambda: model(**inputs, return_dict=False))
    log = subject.path / "training_log.json"
    meta: dict[str, Any] = {
        **environment(args.threads),
        "model": name,
        "model_title": subject.title,
        "regime": subject.regime,
        "mode": plan.mode + ("" if plan.steps == subject.steps else f" ({plan.steps} steps, not {subject.steps})"),
        "plan": dataclasses.asdict(plan),
        "samples": plan.samples,
        "steps": plan.steps,
        "batch": plan.batch,
        "guidance": guidance,
        "cfg": args.cfg,
        "seeds": [args.seed, args.seed + plan.samples - 1],
        "warmup_steps": WARMUP_STEPS,
        "checkpoint": subject.path.name,
        "checkpoint_training_steps": json.loads(log.read_text()).get("steps") if log.exists() else None,
        "compute_shares": shares,
        "timing": "interleaved: per batch, all methods in rotating order; CPU = time.process_time per batch",
        "peak_mem_method": "max over batches of the peak RSS growth during a batch (VmHWM reset via clear_refs)",
        "load_avg_start": os.getloadavg(),
        "cfg_streams": CFG_STREAMS,
        "torchinductor_cache_dir_set": bool(os.environ.get("TORCHINDUCTOR_CACHE_DIR")),
    }
    # A shipped calibration is for the shipped model at its default steps; anything else calibrates into out.
    shipped = plan.steps == subject.steps and subject.calibration.exists()
    calib = subject.calibration if shipped else out / f"fastcache_calibration_{name}_{plan.steps}steps.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {"load_and_shares": time.perf_counter() - start}
    print(f"[{name}] preparing: fastcache calibration and the baselines' fits ...", flush=True)
    tick = time.perf_counter()
    runners: list[Any] = [bl.Baseline(model)]
    if plan.inductor_baseline:
        runners.append(Compiled(copy.deepcopy(model), "none", "-", "inductor"))
    runners += _fastcache_runners(bench, meta, calib, args.alpha)
    runners += _baselines(bench, meta)
    phases["fits"] = time.perf_counter() - tick
    tick = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows, images = sweep(bench, runners, shares)
    phases["warmup_and_timed"] = time.perf_counter() - tick
    if "error" in rows[0]:
        raise RuntimeError(f"the uncached reference run failed: {rows[0]['error']}")
    tick = time.perf_counter()
    quality(rows, images, rows[0]["key"])
    meta["fid_real"] = real_fid(plan.samples)
    phases["quality_and_fid"] = time.perf_counter() - tick
    speedups(rows)
    tick = time.perf_counter()
    _shadows(bench, runners, rows, args.alpha)
    phases["shadow_runs"] = time.perf_counter() - tick
    if plan.probe:
        tick = time.perf_counter()
        meta["diffusers_probe"] = dhk.probe(model, lambda m: bench.batch(m, 0, 4, steps=10), steps=10)
        phases["diffusers_probe"] = time.perf_counter() - tick
    meta["phase_s"] = phases
    meta["load_avg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - start
    report.write(out, rows, meta, {k: v[:10] for k, v in images.items()})
    print((out / "compare.md").read_text())
    return meta


def _mode(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "small" if args.small else "long" if args.long else "default"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="README demo: new MMDiT, 32 samples, eager rows only")
    ap.add_argument("--small", action="store_true", help="per-call overhead: new MMDiT, batch 8, eager rows only")
    ap.add_argument("--long", action="store_true", help="new MMDiT at 50 steps: gaps up to 12, 32 samples, eager rows")
    ap.add_argument("--model", choices=("new", "old", "both"), help="default: new with --quick, else both")
    ap.add_argument("--checkpoint", type=Path, help="folder of the new reference model (default: the shipped one)")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results[/quick]; old model: old-dit/)")
    ap.add_argument("--samples", type=int, help="override the plan's sample count (FID's N; same for every method)")
    ap.add_argument("--batch", type=int, help="override the plan's batch size")
    ap.add_argument("--steps", type=int, help="override the plan's sampling steps")
    ap.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    ap.add_argument("--cfg", choices=("batch", "split"), default="batch")
    ap.add_argument("--alpha", type=float, default=0.05, help="fastcache significance level")
    ap.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    # One thread by default: the reference machine has 2 cores shared with other jobs, where two
    # threads oversubscribe and made a forward 3-8x slower here rather than faster.
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    for name in ("samples", "batch"):
        value = getattr(args, name)
        if value is not None and value < 2:
            raise SystemExit(f"--{name} must be >= 2 (FID needs two samples), got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Every compiled row keeps its own compiled model alive through the interleaved timing.
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    mode = _mode(args)
    names = [args.model or ("new" if mode != "default" else "both")]
    names = ["new", "old"] if names == ["both"] else names
    out = args.out or Path("benchmarks/results" + ("" if mode == "default" else f"/{mode}"))
    start = time.perf_counter()
    for name in names:
        run_model(name, args, out if name == "new" else out / "old-dit")
    print(f"total wall time {time.perf_counter() - start:.0f} s; wrote compare.json, compare.md, *.png in {out}")


if __name__ == "__main__":
    main()
