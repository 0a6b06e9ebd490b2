"""Forecaster parametrisation study: would weights per step, or a term in the input's change, forecast better?

    python -m benchmarks.forecast_params [--generations 16]

The shipped forecaster fits its weights per block and per *gap pattern* (``forecast.fit_table``): every
step with the same gaps to its last K computes shares one row. L2P instead fits weights per pair of
steps. This study scores, on generations the fit did not see, one-block forecasts of the reference
MMDiT (20 steps, batched CFG, K = 3) for the histories each refresh schedule produces:

- ``pattern``: weights per gap pattern (the shipped form);
- ``step``: weights per (step, computed steps), shrunk towards the pattern row (L2P-like);
- ``pattern+dx`` / ``step+dx``: the same with one more term ``u · (x_t − x_{s_1})``, the change of the
  block's own input since its last compute, which the skip path has at hand;
- ``lagrange``: fixed polynomial extrapolation through the 3 residuals (TaylorSeer-like).

Per schedule: the mean relative output error of a skipped block (worst paired output, as the audit
measures it) and the share of forecasts over τ = 0.3. Recording: seeds 1 000 000+ (as the shipped
calibration), 4 samples per generation, the first three quarters fit, the rest scored.
Writes benchmarks/results/forecast_params.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from fastcache_compile import calibration, forecast
from fastcache_compile.backend import fastcache_backend
from fastcache_compile.config import FastCacheConfig
from fastcache_compile.reference import model as mmdit
from fastcache_compile.runtime import recording

OUT = Path(__file__).resolve().parent / "results"
ORDER = 3
TAU = 0.3
RIDGE = 1e-3
SCHEDULES = {  # steps at which every block computes; the others are forecast
    "every 4": (0, 1, 2, 4, 8, 12, 16),
    "every 5": (0, 1, 2, 5, 10, 15),
    "every 6": (0, 1, 2, 6, 12, 18),
    "every 7": (0, 1, 2, 7, 14),
    "0,1,2,8,14": (0, 1, 2, 8, 14),
}
FORMS = ("pattern", "step", "pattern+dx", "step+dx", "lagrange")


def record(generations: int) -> tuple[list[list], list]:
    """Full-computation recordings (``calibration._Recording``) of ``generations`` generations."""
    ref = mmdit.load()
    rec = calibration._Recording(max_rows=1024)
    cfg = FastCacheConfig(threshold=0.0, warmup_steps=0, lowering="eager", max_streams=64)
    compiled = torch.compile(ref.transformer, backend=lambda gm, ex: fastcache_backend(gm, ex, cfg))
    with recording(rec), torch.no_grad():
        for g in range(generations):
            idx = list(range(g * 4, (g + 1) * 4))
            mmdit.sample(ref, compiled, torch.tensor(idx) % 10, [1_000_000 + i for i in idx])
    torch._dynamo.reset()
    return calibration._sequences(rec), rec.layouts


def _joint_grams(gen: list, block: int, lay) -> list[torch.Tensor]:
    """Per paired output the (2T, 2T) inner products of ``[r_0 … r_{T−1}, x_0 … x_{T−1}]``."""
    out = []
    for k, p in enumerate(lay.pairs):
        if p is None:
            continue
        j = lay.streams.index(p)
        r = torch.stack([step[block][1][k].reshape(-1) for step in gen]).double()
        x = torch.stack([step[block][0][j].reshape(-1) for step in gen]).double()
        z = torch.cat([r, x])
        out.append(z @ z.T)
    return out


def _design(t: int, s: tuple[int, ...], steps: int, dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature rows and target as coefficient vectors over ``[r; x]``."""
    rows = [torch.nn.functional.one_hot(torch.tensor(sk), 2 * steps).double() for sk in s]
    if dx:
        rows.append(torch.zeros(2 * steps, dtype=torch.double))
        rows[-1][steps + t], rows[-1][steps + s[0]] = 1.0, -1.0
    return torch.stack(rows), torch.nn.functional.one_hot(torch.tensor(t), 2 * steps).double()


def _normal(grams: list[torch.Tensor], t: int, s: tuple[int, ...], dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, y = _design(t, s, grams[0].shape[0] // 2, dx)
    return sum(a @ m @ a.T for m in grams), sum(a @ m @ y for m in grams)


def _solve(lhs: torch.Tensor, rhs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    mu = RIDGE * float(torch.diagonal(lhs).mean())
    eye = torch.eye(len(rhs), dtype=lhs.dtype)
    return torch.linalg.lstsq(lhs + mu * eye, (rhs + mu * prior)[:, None]).solution[:, 0]


def _error(grams: list[torch.Tensor], t: int, s: tuple[int, ...], w: torch.Tensor, dx: bool) -> float:
    """Relative output error ``‖ŷ − y‖ / ‖y‖`` of the worst paired output."""
    steps = grams[0].shape[0] // 2
    a, y = _design(t, s, steps, dx)
    d = w @ a - y
    out = y.clone()
    out[steps + t] = 1.0  # y_t = x_t + r_t
    return max(float((d @ m @ d).clamp_min(0) / (out @ m @ out)) ** 0.5 for m in grams)


def _histories(computes: tuple[int, ...], steps: int) -> list[tuple[int, tuple[int, ...]]]:
    out = []
    for t in range(steps):
        prev = sorted((c for c in computes if c < t), reverse=True)[:ORDER]
        if t not in computes and len(prev) == ORDER:
            out.append((t, tuple(prev)))
    return out


def score(seqs: list[list], layouts: list, train_share: float = 0.75) -> dict[str, dict[str, dict[str, float]]]:
    n_train = max(1, int(len(seqs) * train_share))
    train, held = seqs[:n_train], seqs[n_train:]
    steps = len(seqs[0])
    errs: dict[str, dict[str, list[float]]] = {name: {f: [] for f in FORMS} for name in SCHEDULES}
    for b, lay in enumerate(layouts):
        tr = [m for gen in train for m in _joint_grams(gen, b, lay)]
        he = [_joint_grams(gen, b, lay) for gen in held]
        if not tr:
            continue  # no paired output: the skip path reuses the cached output
        for name, computes in SCHEDULES.items():
            for t, s in _histories(computes, steps):
                gaps = tuple(a - c for a, c in itertools.pairwise((t, *s)))
                back = [sum(gaps[: k + 1]) for k in range(ORDER)]
                same = [(u, tuple(u - d for d in back)) for u in range(back[-1], steps)]  # the gap pattern
                for dx in (False, True):
                    prior = torch.zeros(ORDER + dx, dtype=torch.double)
                    prior[0] = 1.0  # plain reuse, as forecast.fit_table shrinks towards
                    lhs, rhs = (sum(v) for v in zip(*(_normal(tr, u, su, dx) for u, su in same)))
                    w_pat = _solve(lhs, rhs, prior)
                    w_step = _solve(*_normal(tr, t, s, dx), w_pat)
                    tag = "+dx" if dx else ""
                    for g in he:
                        errs[name]["pattern" + tag].append(_error(g, t, s, w_pat, dx))
                        errs[name]["step" + tag].append(_error(g, t, s, w_step, dx))
                w_fix = torch.tensor(forecast.lagrange_weights(gaps), dtype=torch.double)
                errs[name]["lagrange"] += [_error(g, t, s, w_fix, False) for g in he]
    return {
        name: {f: {"mean_error": sum(v) / len(v), "over_tau": sum(e > TAU for e in v) / len(v), "n": len(v)}
               for f, v in per.items()}
        for name, per in errs.items()
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generations", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seqs, layouts = record(args.generations)
    result = score(seqs, layouts)
    OUT.mkdir(exist_ok=True)
    meta = {"generations": len(seqs), "order": ORDER, "tau": TAU, "wall_s": round(time.perf_counter() - t0, 1)}
    (OUT / "forecast_params.json").write_text(json.dumps({"meta": meta, "schedules": result}, indent=2))
    lines = [
        f"# Forecaster parametrisation (K = {ORDER}, held-out one-block forecasts)",
        "",
        f"{meta['generations']} generations of 4 samples, the first 3/4 fit; mean relative output error of a skipped "
        f"block / share over τ = {TAU}.",
        "",
        "| computes | " + " | ".join(FORMS) + " |",
        "|---|" + "---|" * len(FORMS),
    ]
    for name, per in result.items():
        cells = [f"{per[f]['mean_error']:.4f} / {100 * per[f]['over_tau']:.1f} %" for f in FORMS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (OUT / "forecast_params.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
