"""The timed part of ``benchmarks.compare``: the shared sampling call, and one interleaved sweep.

Every method is set up (own model copy) and warmed up first; then the timed phase goes batch by batch,
and within each batch over all methods in a rotating order. Process CPU time, wall time and peak RSS
growth are recorded per batch; quality is against the uncached eager samples of the same seeds.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.utils

from benchmarks import subjects
from benchmarks.compare_env import describe_error
from benchmarks.fastcache_runs import Compiled
from benchmarks.metrics import PeakRss, psnr, rel_l2, ssim
from benchmarks.plans import Plan
from benchmarks.reference.fid import fid_with_interval

WARMUP_STEPS = 4  # warm-up generation: enough for both fastcache variants (init + cached) to compile
OTHER_SEEDS = 1_000_000  # calibration / fitting seeds, disjoint from the evaluated ones


class Bench:
    """Labels, seeds and the sampling call every method shares."""

    def __init__(self, subject: subjects.Subject, plan: Plan, guidance: float, cfg: str, seed: int) -> None:
        self.subject, self.plan, self.guidance, self.cfg = subject, plan, guidance, cfg
        self.labels = torch.arange(plan.samples) % 10
        self.seeds = [seed + i for i in range(plan.samples)]

    def gen(self, model: Any, labels: torch.Tensor, seeds: list[int], steps: int | None = None) -> torch.Tensor:
        steps = self.plan.steps if steps is None else steps
        return self.subject.generate(model, labels, seeds, steps, self.guidance, self.cfg)

    def batch(self, model: Any, lo: int, hi: int, steps: int | None = None) -> torch.Tensor:
        return self.gen(model, self.labels[lo:hi], self.seeds[lo:hi], steps)

    def other_runs(self, generations: int, size: int, first: int = OTHER_SEEDS) -> Any:
        """``run(m)``: ``generations`` full-length generations of ``size`` samples with unused seeds."""

        def run(m: Any) -> None:
            for g in range(generations):
                idx = range(g * size, (g + 1) * size)
                self.gen(m, torch.tensor(list(idx)) % 10, [first + i for i in idx])

        return run


def _row(runner: Any) -> dict[str, Any]:
    row = {"method": runner.method, "setting": runner.setting, "lowering": getattr(runner, "lowering", "eager")}
    row["key"] = f"{row['method']}|{row['setting']}|{row['lowering']}"
    return row


def sweep(bench: Bench, runners: list[Any], shares: dict[str, float]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Warm every runner up, then time them interleaved batch by batch; returns rows and images."""
    p = bench.plan
    rows = [_row(r) for r in runners]
    live: list[int] = []
    for k, runner in enumerate(runners):
        try:
            runner.__enter__()
            live.append(k)
            t0 = time.perf_counter()
            bench.batch(runner.model, 0, min(p.batch, p.samples), steps=WARMUP_STEPS)
            rows[k]["warmup_s"] = time.perf_counter() - t0
            runner.clear_stats()
        except Exception as err:  # one broken method must not sink the sweep: record why
            rows[k]["error"] = describe_error(err)
        print(f"  ready {rows[k]['key']}: {rows[k].get('error') or 'ok'}", flush=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    outs: dict[int, list[torch.Tensor]] = {k: [] for k in live}
    wall: dict[int, list[float]] = {k: [] for k in live}
    cpu: dict[int, list[float]] = {k: [] for k in live}
    mem: dict[int, list[float]] = {k: [] for k in live}
    starts = list(range(0, p.samples, p.batch))
    for b, lo in enumerate(starts):
        active = [k for k in live if "error" not in rows[k]]
        shift = b % max(len(active), 1)  # rotate: no method always runs first (or right after another)
        for k in active[shift:] + active[:shift]:
            try:
                runners[k].reset()
                with PeakRss() as peak:
                    t0, c0 = time.perf_counter(), time.process_time()
                    outs[k].append(bench.batch(runners[k].model, lo, min(lo + p.batch, p.samples)))
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.process_time() - c0)
                mem[k].append(peak.mb if peak.mb is not None else math.nan)
            except Exception as err:
                rows[k]["error"] = describe_error(err)
        print(f"  batch {b + 1}/{len(starts)} done", flush=True)
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    images: dict[str, torch.Tensor] = {}
    for k in live:
        runner, row = runners[k], rows[k]
        if "error" not in row:
            row["flops_skipped"] = runner.flops_skipped(shares["attention_fraction_of_block"])
            if isinstance(runner, Compiled):
                row["recompiles_during_timing_all_rows"] = recompiles
                row["compiled_variants"] = runner.stats().get("compiled_variants")
            images[row["key"]] = torch.cat(outs[k])
            row["latency_s"] = sum(wall[k]) / len(wall[k])
            # Process CPU time per batch: with one torch thread it is what the latency would be on an
            # idle machine, and unlike wall time it does not grow when other jobs share the cores.
            row["cpu_s"] = sum(cpu[k]) / len(cpu[k])
            row["batch_latencies_s"] = wall[k]
            row["batch_cpu_s"] = cpu[k]
            row["peak_mem_mb"] = max(mem[k])
            per_step = row["latency_s"] / p.steps
            inductor = row["lowering"] == "inductor"
            row["compile_s"] = max(0.0, row["warmup_s"] - WARMUP_STEPS * per_step) if inductor else None
            row["notes"] = runner.notes
            row["ideal_speedup"] = 1.0 / (1.0 - row["flops_skipped"] * shares["block_fraction"])
        try:
            runner.__exit__(None, None, None)
        except Exception as err:
            row.setdefault("error", describe_error(err))
    return rows, images


def quality(rows: list[dict], images: dict[str, torch.Tensor], ref_key: str) -> None:
    ref = images[ref_key]
    for row in rows:
        img = images.get(row["key"])
        if img is None:
            continue
        if row["key"] == ref_key:
            row.update(psnr=None, ssim=1.0, rel_l2=0.0)
        else:
            row.update(psnr=psnr(img, ref), ssim=ssim(img, ref), rel_l2=rel_l2(img, ref))
        row["fid"], row["fid_lo"], row["fid_hi"] = fid_with_interval(img)


def speedups(rows: list[dict]) -> None:
    base = {r["lowering"]: r for r in rows if r["method"] == "none" and "latency_s" in r}
    for r in rows:
        if "latency_s" in r and r["lowering"] in base:
            r["speedup"] = base[r["lowering"]]["latency_s"] / r["latency_s"]
            r["speedup_cpu"] = base[r["lowering"]]["cpu_s"] / r["cpu_s"]
            # Compute efficiency of the skipping: saved CPU time against the FLOP-based ideal.
            r["speedup_vs_ideal"] = r["speedup_cpu"] / r["ideal_speedup"]
