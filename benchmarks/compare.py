"""Sweep FastCache and the cache baselines on the reference DiT and write one comparison report.

    python -m benchmarks.compare [--quick] [--out DIR]

Every method sees the same model (loaded once, so a checkpoint rewritten by a running training job
cannot change mid-sweep), scheduler, labels and per-sample seeds. Each row: a short warm-up generation
(for Inductor it holds the compile, reported as ``compile_s``), then all samples in fixed-size batches,
timed per batch. Quality is against the uncached eager samples. Outputs: compare.json, compare.md,
pareto_psnr.png, pareto_fid.png, samples_grid.png in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch._dynamo.utils
from tqdm import tqdm

from benchmarks import baselines as bl
from benchmarks import diffusers_hooks as dhk
from benchmarks import report
from benchmarks.fastcache_runs import Compiled, bound_violations, ensure_calibration, fastcache_options
from benchmarks.metrics import PeakRss, compute_shares, psnr, rel_l2, ssim
from benchmarks.reference.fid import fid_fmnist
from benchmarks.reference.pipeline import DEFAULT_GUIDANCE, DEFAULT_PATH, load_reference, load_scheduler, sample
from fastcache_compile.backend import resolve_form
from fastcache_compile.calibration import load as load_calibration

CFG_STREAMS = {
    "fastcache": "runtime keeps one state slot per conditioning stream, matched by the class_labels input",
    "fora / fbc / teacache": "state keyed by the class_labels (and shape) each block receives",
    "diffusers-fbc / -magcache / -taylorseer": "diffusers StateManager per cache_context name (cond / uncond)",
    "diffusers-pab": "shipped hook shares one state across calls; the harness swaps a per-stream state in",
}
SHIPPED_CALIBRATION = DEFAULT_PATH / "fastcache_calibration.safetensors"
DEFAULT_STEPS = 50
WARMUP_STEPS = 4  # warm-up generation: enough for both fastcache variants (init + cached) to compile
_REPO = str(Path(__file__).resolve().parents[1])
OTHER_SEEDS = 1_000_000  # calibration / fitting seeds, disjoint from the evaluated ones


@dataclass
class Plan:
    """What one mode sweeps. Settings span light to aggressive caching on the reference model (chosen
    from a 50-step sweep: e.g. FBC at 0.05 never skips, TeaCache above 0.2 drops below 15 dB PSNR)."""

    mode: str
    samples: int
    batch: int
    steps: int
    shadow_samples: int  # samples of the eager shadow run that measures bound violations
    calibration_generations: int  # generations of 4 samples for fastcache_compile.calibrate
    fastcache: tuple[tuple[str, float, str], ...]  # (approximation, τ, lowering) per fastcache row
    tokens: tuple[tuple[float, float, bool], ...]  # (τ, token_threshold, merge) per fastcache+tokens row
    fora: tuple[int, ...]
    fbc: tuple[float, ...]
    teacache: tuple[float, ...]
    diffusers_fbc: tuple[float, ...]
    pab: tuple[int, ...]
    taylorseer: tuple[int, ...]
    magcache: tuple[float, ...]


def _grid(forms: tuple[str, ...], taus: tuple[float, ...], lowerings: tuple[str, ...]) -> tuple:
    return tuple((f, t, low) for f in forms for t in taus for low in lowerings)


# fastcache: "auto" = the trajectory form with the calibration; "reuse" = y ≈ x + r̂, no calibration.
# Default: every row generates all 80 samples at 50 steps. Measured at 16 samples, all rows together cost
# ~16 s of CPU per sample, plus ~6.5 min fixed (fits, compiles, shadow runs, warm-ups) and ~3 min more
# when the calibration must be (re)fitted: ~30 min at one thread on an idle 2-core machine. FID-FMNIST at
# N = 80 (< 128 feature dims) is biased upwards, identically for every row; raise --samples if time allows.
DEFAULT = Plan(
    "default", 80, 40, DEFAULT_STEPS, 16, 4,
    # every skip-path form at the same τ values (Inductor), so forms compare at equal skip rates
    (*_grid(("linear", "trajectory", "reuse"), (0.03, 0.05, 0.1), ("inductor",)), ("auto", 0.05, "eager")),
    ((0.03, 0.05, False), (0.03, 0.1, False), (0.03, 0.05, True)),
    (2, 3), (0.07, 0.1), (0.05, 0.1), (0.07, 0.1), (2, 3), (2, 3), (0.02, 0.06),
)  # fmt: skip
QUICK = Plan(
    "quick", 16, 16, 20, 8, 2,
    (("auto", 0.1, "inductor"), ("auto", 0.1, "eager"), ("reuse", 0.1, "eager")),
    ((0.05, 0.1, False), (0.05, 0.1, True)),
    (2,), (0.1,), (0.1,), (0.1,), (2,), (2,), (0.06,),
)  # fmt: skip


class Bench:
    """Runs one method over all samples and measures it."""

    def __init__(self, model: torch.nn.Module, plan: Plan, guidance: float, cfg: str, seed: int) -> None:
        self.model, self.plan, self.guidance, self.cfg = model, plan, guidance, cfg
        self.labels = torch.arange(plan.samples) % 10
        self.seeds = [seed + i for i in range(plan.samples)]
        self.scheduler = load_scheduler()
        self.shares: dict[str, float] = {}
        self.ref: torch.Tensor | None = None

    def gen(self, model: Any, labels: torch.Tensor, seeds: list[int], steps: int | None = None) -> torch.Tensor:
        steps = self.plan.steps if steps is None else steps
        return sample(model, labels, seeds, steps, self.guidance, self.cfg, self.scheduler)  # type: ignore[arg-type]

    def batch(self, model: Any, lo: int, hi: int, steps: int | None = None) -> torch.Tensor:
        return self.gen(model, self.labels[lo:hi], self.seeds[lo:hi], steps)

    def other_runs(self, generations: int, size: int) -> Callable[[Any], None]:
        """``run(m)``: ``generations`` full-length generations of ``size`` samples with unused seeds."""

        def run(m: Any) -> None:
            for g in range(generations):
                idx = range(g * size, (g + 1) * size)
                self.gen(m, torch.tensor(list(idx)) % 10, [OTHER_SEEDS + i for i in idx])

        return run

    def run(self, runner: Any) -> tuple[dict[str, Any], torch.Tensor | None]:
        p = self.plan
        row: dict[str, Any] = {"method": runner.method, "setting": runner.setting}
        row["lowering"] = getattr(runner, "lowering", "eager")
        row["key"] = f"{row['method']}|{row['setting']}|{row['lowering']}"
        row["load_avg"] = round(os.getloadavg()[0], 2)
        try:
            with runner, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                self.batch(runner.model, 0, min(p.batch, p.samples), steps=WARMUP_STEPS)
                warm = time.perf_counter() - t0
                runner.clear_stats()
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                outs, times, cpu = [], [], []
                with PeakRss() as mem:
                    for lo in range(0, p.samples, p.batch):
                        runner.reset()
                        t0, c0 = time.perf_counter(), time.process_time()
                        outs.append(self.batch(runner.model, lo, min(lo + p.batch, p.samples)))
                        times.append(time.perf_counter() - t0)
                        cpu.append(time.process_time() - c0)
                row["flops_skipped"] = runner.flops_skipped(self.shares["attention_fraction_of_block"])
                if isinstance(runner, Compiled):
                    # Dynamo graphs compiled after the warm-up: 0 unless something recompiles per step.
                    row["recompiles"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
                    row["compiled_variants"] = runner.stats().get("compiled_variants")
        except Exception as err:  # one broken method must not sink the sweep: record why
            # Name the innermost frame of this repository (not of torch) so a report reader sees where it broke.
            frames = traceback.extract_tb(err.__traceback__)
            ours = [f for f in frames if _REPO in f.filename and ".venv" not in f.filename] or frames[-1:]
            where = f" (at {Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}{where}"
            return row, None
        images = torch.cat(outs)
        row["latency_s"] = sum(times) / len(times)
        # Process CPU time per batch: with one torch thread it is what the latency would be on an idle
        # machine, and unlike wall time it does not grow when other jobs share the cores.
        row["cpu_s"] = sum(cpu) / len(cpu)
        row["batch_latencies_s"] = times
        per_step = row["latency_s"] / p.steps
        row["compile_s"] = max(0.0, warm - WARMUP_STEPS * per_step) if row["lowering"] == "inductor" else None
        row["peak_mem_mb"] = mem.mb
        row["notes"] = runner.notes
        ideal = 1.0 / (1.0 - row["flops_skipped"] * self.shares["block_fraction"])
        row["ideal_speedup"] = ideal
        if self.ref is not None:
            row.update(psnr=psnr(images, self.ref), ssim=ssim(images, self.ref), rel_l2=rel_l2(images, self.ref))
        row["fid"] = fid_fmnist(images)
        return row, images


def _baselines(bench: Bench, meta: dict[str, Any]) -> list[Any]:
    """Runners for every baseline setting (fits TeaCache's polynomial and MagCache's ratios first)."""
    p, m = bench.plan, bench.model
    runners: list[Any] = [bl.Fora(m, n) for n in p.fora]
    runners += [bl.FirstBlockCache(m, t) for t in p.fbc]
    if p.teacache:
        with torch.no_grad():
            fit = bl.fit_teacache(m, bench.other_runs(2, 8))
        meta["teacache_fit"] = fit
        runners += [bl.TeaCache(m, t, fit["coefficients"], p.steps, fit["input_change_range"]) for t in p.teacache]
    runners += [dhk.first_block_cache(m, t) for t in p.diffusers_fbc]
    runners += [dhk.PyramidBroadcast(m, r) for r in p.pab]
    runners += [dhk.taylorseer(m, i) for i in p.taylorseer]
    if p.magcache:
        ratios = dhk.calibrate_magcache(m, bench.other_runs(1, 8), p.steps)
        meta["magcache_ratios"] = ratios
        runners += [dhk.magcache(m, t, ratios, p.steps) for t in p.magcache]
    return runners


def _fastcache_runners(bench: Bench, meta: dict[str, Any], calib: Path, alpha: float) -> list[Any]:
    """fastcache rows; fits (or reuses) the calibration first and records it in ``meta``."""
    p, m = bench.plan, bench.model
    probe_x = torch.randn(2, 1, 32, 32)

    def probe(c: Any) -> Any:
        return c(hidden_states=probe_x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([0, 10]))

    meta["calibration"] = ensure_calibration(m, calib, bench.other_runs(p.calibration_generations, 4), probe)
    form = resolve_form("auto", load_calibration(calib))
    runners: list[Any] = []
    for approximation, tau, low in p.fastcache:
        opts = fastcache_options(tau, approximation, low, p.steps, calib, alpha)
        method = "fastcache" if approximation == "auto" else f"fastcache-{approximation}"
        runners.append(Compiled(m, method, f"τ={tau:g}", low, opts))
        runners[-1].notes = f"approximation auto → {form}" if approximation == "auto" else ""
    for tau, theta, merge in p.tokens:
        # Token selection (and merging) on top of the block cache, fitted forms incl. W_s (see
        # benchmarks/token_select.py for the sweep at 256 tokens).
        opts = fastcache_options(tau, "auto", "inductor", p.steps, calib, alpha)
        opts.update(token_select=True, token_threshold=theta, token_merge=merge, merge_ratio=0.5)
        method = "fastcache+tokens+merge" if merge else "fastcache+tokens"
        setting = f"τ={tau:g} θ={theta:g}" + (" r=0.5" if merge else "")
        runners.append(Compiled(m, method, setting, "inductor", opts))
    return runners


def _display_path(path: Path) -> str:
    """Repository-relative where possible, so results carry no machine-specific paths."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return Path(path).name


def _env(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few samples/settings, 20 steps: a ~3 minute smoke run")
    ap.add_argument(
        "--out", type=Path, help="results folder (default benchmarks/results, or benchmarks/results/quick with --quick)"
    )
    ap.add_argument("--samples", type=int, help="override the mode's sample count (same for every method)")
    ap.add_argument("--batch", type=int, help="override the mode's batch size")
    ap.add_argument("--steps", type=int, help="override the mode's DDIM step count")
    ap.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ap.add_argument("--cfg", choices=("batch", "split"), default="batch")
    ap.add_argument("--alpha", type=float, default=0.05, help="fastcache significance level")
    ap.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    # One thread by default: the reference machine has 2 cores shared with other jobs, where two
    # threads oversubscribe and made a forward 3-8x slower here rather than faster.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=DEFAULT_PATH)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else DEFAULT
    if args.out is None:  # a quick run never overwrites the committed full results
        args.out = Path("benchmarks/results/quick" if args.quick else "benchmarks/results")
    over = {k: getattr(args, k) for k in ("samples", "batch", "steps") if getattr(args, k) is not None}
    plan = dataclasses.replace(plan, **over)
    start = time.perf_counter()
    model = load_reference(args.model)
    bench = Bench(model, plan, args.guidance, args.cfg, args.seed)
    b = 2 * min(plan.batch, plan.samples)
    x, t, y = torch.randn(b, 1, 32, 32), torch.full((b,), 500), torch.arange(b) % 11
    bench.shares = compute_shares(model, lambda: model(hidden_states=x, timestep=t, class_labels=y, return_dict=False))
    log = Path(args.model) / "training_log.json"
    meta: dict[str, Any] = {
        **_env(args.threads),
        "mode": plan.mode + ("" if plan.steps == DEFAULT_STEPS else f" ({plan.steps} steps, not {DEFAULT_STEPS})"),
        "plan": dataclasses.asdict(plan),
        "samples": plan.samples,
        "steps": plan.steps,
        "batch": plan.batch,
        "guidance": args.guidance,
        "cfg": args.cfg,
        "seeds": [args.seed, args.seed + plan.samples - 1],
        "warmup_steps": WARMUP_STEPS,
        "checkpoint": _display_path(args.model),
        "checkpoint_training_steps": json.loads(log.read_text()).get("steps") if log.exists() else None,
        "compute_shares": bench.shares,
        "peak_mem_method": "peak RSS growth during the timed generations (VmHWM reset via /proc/self/clear_refs)",
        "load_avg_start": os.getloadavg(),
        "cfg_streams": CFG_STREAMS,
    }
    # The shipped file is for the shipped model at the default step count; anything else calibrates into --out.
    shipped = plan.steps == DEFAULT_STEPS and args.model.resolve() == DEFAULT_PATH.resolve()
    calib = SHIPPED_CALIBRATION if shipped else None
    calib = calib or args.out / f"fastcache_calibration_{plan.steps}steps.safetensors"
    args.out.mkdir(parents=True, exist_ok=True)

    print("preparing: fastcache calibration, TeaCache polynomial, MagCache ratios ...", flush=True)
    phases: dict[str, float] = {"load_and_shares": time.perf_counter() - start}
    reference = bl.Baseline(model)
    runners: list[Any] = [reference, Compiled(model, "none", "-", "inductor")]
    tick = time.perf_counter()
    runners += _fastcache_runners(bench, meta, calib, args.alpha)
    phases["fastcache_calibration"] = time.perf_counter() - tick
    tick = time.perf_counter()
    runners += _baselines(bench, meta)
    phases["teacache_magcache_fits"] = time.perf_counter() - tick
    tick = time.perf_counter()

    rows: list[dict[str, Any]] = []
    images: dict[str, torch.Tensor] = {}
    shadows: dict[tuple, tuple[float | None, int]] = {}

    def shadow_run(m: Any) -> None:
        bench.batch(m, 0, plan.shadow_samples)

    for runner in tqdm(runners, desc="methods", unit="row"):
        row, img = bench.run(runner)
        if runner is reference:
            if img is None:
                raise RuntimeError(f"the uncached reference run failed: {row.get('error')}")
            bench.ref = img
            row.update(psnr=None, ssim=1.0, rel_l2=0.0)
        if isinstance(runner, Compiled) and runner.is_fastcache and not runner.options.get("token_select"):
            # (the shadow check covers block skips; token rows have no per-block bound to check)
            key = (runner.options["threshold"], runner.options["approximation"])
            if key not in shadows:
                try:
                    shadows[key] = bound_violations(model, runner.options, shadow_run)
                except Exception as err:  # the shadow run is a measurement; its failure is reported
                    shadows[key] = (None, 0)
                    row["notes"] = f"{row.get('notes', '')} shadow run failed: {type(err).__name__}: {err}"[:300]
            row["bound_violations"], row["shadow_skips"] = shadows[key]
            row["alpha"] = args.alpha
        rows.append(row)
        if img is not None:
            images[row["key"]] = img[:10]
        tqdm.write(f"  {row['key']}: " + (row.get("error") or f"{row['latency_s']:.2f} s/batch"))

    phases["rows_incl_shadow_runs"] = time.perf_counter() - tick
    base = {r["lowering"]: r for r in rows if r["method"] == "none" and "latency_s" in r}
    for r in rows:
        if "latency_s" in r and r["lowering"] in base:
            r["speedup"] = base[r["lowering"]]["latency_s"] / r["latency_s"]
            r["speedup_cpu"] = base[r["lowering"]]["cpu_s"] / r["cpu_s"]
            # Compute efficiency of the skipping: saved CPU time against the FLOP-based ideal.
            r["speedup_vs_ideal"] = r["speedup_cpu"] / r["ideal_speedup"]
    print("probing diffusers cache configs ...", flush=True)
    tick = time.perf_counter()
    meta["diffusers_probe"] = dhk.probe(model, lambda m: bench.batch(m, 0, 4, steps=10), steps=10)
    phases["diffusers_probe"] = time.perf_counter() - tick
    meta["phase_s"] = phases
    meta["load_avg_end"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - start
    report.write(args.out, rows, meta, images)
    print((args.out / "compare.md").read_text())
    print(f"wrote {args.out}/compare.json, compare.md, pareto_psnr.png, pareto_fid.png, samples_grid.png")


if __name__ == "__main__":
    main()
