"""Helpers shared by the ``fastcache`` subcommands: their cache and sampling options, the sampler they
time, and the warm-up that builds every graph before timing starts."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from .config import FastCacheConfig

_DEFAULTS = FastCacheConfig()


def _say(start: float) -> Any:
    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)

    return say


def _cache_options(p: argparse.ArgumentParser, lowering: bool = True) -> None:
    p.add_argument("--threshold", type=float, default=_DEFAULTS.threshold, help="τ: tolerated relative RMS change")
    p.add_argument("--alpha", type=float, default=_DEFAULTS.alpha, help="significance level of the χ² test")
    p.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    p.add_argument("--num-steps", type=int, default=None, help="steps per generation (forces the last)")
    p.add_argument("--max-streams", type=int, default=_DEFAULTS.max_streams, help="conditioning-stream slots")
    p.add_argument("--calibration", default=None, help="file written by `fastcache calibrate`")
    p.add_argument("--approximation", default="auto", choices=("auto", "reuse", "trajectory", "linear", "direct"))
    if lowering:
        p.add_argument("--lowering", default=_DEFAULTS.lowering, choices=("inductor", "eager"))


def _sampling_options(p: argparse.ArgumentParser, n: int, seed: int) -> None:
    p.add_argument("--n", type=int, default=n, help="images per generation (labels 0, 1, ..., 9, 0, ...)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's sampling.json)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's sampling.json)")
    p.add_argument("--cfg", choices=("batch", "split"), default="batch", help="one 2N batch or two calls per step")
    p.add_argument("--seed", type=int, default=seed, help="image i uses seed + i")


def _options(args: argparse.Namespace, steps: int | None) -> dict[str, Any]:
    options = {
        "threshold": args.threshold,
        "alpha": args.alpha,
        "warmup_steps": args.warmup_steps,
        # The command knows the step count, so the last step can always compute.
        "num_steps": args.num_steps if args.num_steps is not None else steps,
        "max_streams": args.max_streams,
        "calibration": args.calibration,
        "approximation": args.approximation,
    }
    if "lowering" in args:
        options["lowering"] = args.lowering
    FastCacheConfig.from_options(options)  # a bad value raises ValueError naming the option
    return options


def _sampler(args: argparse.Namespace, ref: Any) -> tuple[Any, int]:
    from .reference import sample

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    steps = ref.steps if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    labels = torch.arange(args.n) % 10

    def run(model: Any, n_steps: int = steps, seed: int = args.seed) -> torch.Tensor:
        return sample(ref, model, labels, seed, steps=n_steps, guidance=args.guidance, cfg=args.cfg)

    return run, steps


def _compiled(ref: Any, options: dict[str, Any]) -> torch.nn.Module:
    return torch.compile(ref.transformer, backend="fastcache", options=options)


def _warm(run: Any, model: Any, steps: int, warmup: int) -> None:
    # Enough steps that both the first-call graph and the cached graph are built before timing.
    run(model, n_steps=min(steps, warmup + 2))
