"""What ``benchmarks.compare`` sweeps, per model and mode (settings only; no code runs here).

Settings span light to aggressive caching. Costs (1 torch thread, idle core): the new MMDiT takes
~0.45 s of CPU per sample at 20 steps with batched CFG, so one row of 500 samples is ~4 min; the old DiT
~16 s of CPU per sample at 50 steps for all rows together (80 samples, ~30 min in all).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """One sweep. Tuples hold one entry per row."""

    mode: str
    samples: int
    batch: int
    steps: int
    shadow_samples: int  # samples of the eager shadow run that measures bound violations
    calibration_generations: int  # generations of 4 samples for fastcache_compile.calibrate
    fastcache: tuple[tuple, ...]  # (approximation, τ, lowering[, extra options such as {"max_skips": 2}])
    tokens: tuple[tuple[float, float, bool], ...]  # (τ, token_threshold, merge) per fastcache+tokens row
    fora: tuple[int, ...] = ()
    fbc: tuple[float, ...] = ()
    teacache: tuple[float, ...] = ()
    diffusers_fbc: tuple[float, ...] = ()
    pab: tuple[int, ...] = ()
    taylorseer: tuple[tuple, ...] = ()  # (interval, order[, "blocks": whole blocks, not attention only])
    magcache: tuple[float, ...] = ()
    cachedit: tuple[tuple[int, int, float, int], ...] = ()  # (Fn, Bn, residual diff threshold, TaylorSeer order)
    inductor_baseline: bool = True  # an uncached Inductor row (the denominator of Inductor rows' speedups)
    # the forecaster table's largest gap (``calibrate(forecast_max_gap=...)``); None: whatever a fitting
    # (shipped) calibration has, or the default for a new fit
    calibration_max_gap: int | None = None
    calibration_drift: dict | None = None  # ``calibrate(drift=...)`` options when the benchmark fits one
    probe: bool = True  # the diffusers cache-config compatibility probe


def _grid(forms: tuple[str, ...], taus: tuple[float, ...], lowerings: tuple[str, ...]) -> tuple:
    return tuple((f, t, low) for f in forms for t in taus for low in lowerings)


# fastcache approximation "auto" = the form the calibration recommends; "reuse" = y ≈ x + r̂.
# Eager lowering everywhere: every peer is an eager hook, so eager-vs-eager is the like-for-like speed
# comparison, and on a shared 2-core CPU each Inductor compile of a cached variant costs minutes.
NEW_DEFAULT = Plan(
    "default", 100, 50, 20, 16, 4,
    (
        *_grid(("auto",), (0.05, 0.1, 0.2), ("eager",)),
        *_grid(("forecast",), (0.05, 0.1, 0.2), ("eager",)),
        # the refresh study's picks (benchmarks/results/refresh_study.md): a synchronised refresh every
        # 4 steps (+3.6 dB at 65 % skipped), or a cap of 2 consecutive skips per block (+2 dB at 60 %)
        ("forecast", 0.1, "eager", {"refresh_every": 4}),
        ("forecast", 0.2, "eager", {"refresh_every": 4}),
        # without forcing the last step (one more skip per block), and a refresh every 5 steps, which the
        # shipped table's gaps of up to 6 allow (its drift pairs were recorded under that policy)
        ("forecast", 0.3, "eager", {"refresh_every": 4, "num_steps": None}),
        ("forecast", 0.3, "eager", {"refresh_every": 5, "num_steps": None}),
        # more skipping at the same policy: looser τ, or a refresh every 6 steps (the table's largest gap)
        ("forecast", 0.4, "eager", {"refresh_every": 5, "num_steps": None}),
        ("forecast", 0.3, "eager", {"refresh_every": 6, "num_steps": None}),
        ("forecast", 0.2, "eager", {"max_skips": 2}),
        ("reuse", 0.1, "eager"),
    ),
    (),
    fora=(2, 3), fbc=(0.1,), teacache=(0.3,), diffusers_fbc=(0.1,), pab=(2,),
    # intervals 2-10 (the issue's sweep), attention only (diffusers' default) and whole blocks
    taylorseer=(
        *((i, o) for i in (2, 3) for o in (1, 2)),
        *((i, o, "blocks") for i in (2, 3, 4, 5, 6, 8, 10) for o in (1, 2)),
    ),
    magcache=(0.06,),
    # Bn ≥ 1: with Bn = 0, cache-dit 1.5.3 looks up a "Bn_residual" state after a context refresh that
    # it never wrote (AssertionError on the trained model's second generation).
    cachedit=((1, 1, 0.08, 0), (1, 1, 0.16, 0), (1, 1, 0.08, 1), (1, 1, 0.16, 1)),
    inductor_baseline=False,
    probe=False,  # the probe's notes describe DiT; the rows above cover diffusers' hooks on the MMDiT
)  # fmt: skip
# README demo: eager only (no Inductor compile), so a cold machine finishes in minutes.
NEW_QUICK = Plan(
    "quick", 32, 16, 20, 8, 2,
    # the shipped calibration holds the fitted forecaster; refresh every 5 steps, the last step not
    # forced: the compare's fastest row at >= 30 dB
    (("forecast", 0.3, "eager", {"refresh_every": 5, "num_steps": None}),),
    (),
    fora=(2,),
    # the best peer at >= 30 dB in the full comparison: TaylorSeer order 1, interval 4, on whole blocks
    taylorseer=((4, 1, "blocks"),),
    # F1B1: F1B0 + TaylorSeer failed after the context refresh on the trained model (cache-dit looks up
    # a "Bn_residual" state that Bn=0 never writes); F1B1 passes the same refresh in tests/test_peers.py.
    cachedit=((1, 1, 0.16, 1),),
    inductor_baseline=False,
    probe=False,
)  # fmt: skip
# Per-call overhead (issue: ≥ 0.9 × ideal at small sizes): batch 8 (16 rows with batched CFG, 68 tokens),
# where the runtime's host work weighs most against the block compute. Hand-written FORA is the yardstick.
NEW_SMALL = Plan(
    "small", 32, 8, 20, 8, 2,
    (
        ("reuse", 0.1, "eager"), ("reuse", 0.2, "eager"), ("forecast", 0.1, "eager"), ("forecast", 0.2, "eager"),
        ("forecast", 0.2, "eager", {"refresh_every": 4}),
    ),
    (),
    fora=(2, 3),
    inductor_baseline=False,
    probe=False,
)  # fmt: skip
OLD_DEFAULT = Plan(
    "default", 80, 40, 50, 16, 4,
    (*_grid(("linear", "trajectory", "reuse"), (0.03, 0.05, 0.1), ("inductor",)), ("auto", 0.05, "eager")),
    ((0.03, 0.05, False), (0.03, 0.1, False), (0.03, 0.05, True)),
    fora=(2, 3), fbc=(0.07, 0.1), teacache=(0.05, 0.1), diffusers_fbc=(0.07, 0.1), pab=(2, 3),
    taylorseer=((2, 1), (3, 1), (2, 2)), magcache=(0.02, 0.06),
    cachedit=((1, 0, 0.08, 0), (1, 0, 0.08, 1)),
)  # fmt: skip
OLD_QUICK = Plan(
    "quick", 16, 16, 20, 8, 2,
    (
        ("auto", 0.1, "eager"), ("reuse", 0.1, "eager"), ("forecast", 0.1, "eager"), ("forecast", 0.2, "eager"),
        ("forecast", 0.2, "eager", {"refresh_every": 4}),
    ),
    (),
    fora=(2,), taylorseer=((2, 2),), cachedit=((1, 0, 0.08, 1),),
    inductor_baseline=False, probe=False,
)  # fmt: skip
# Longer sampler (50 steps): consecutive steps are closer, so larger gaps between computes pay off; the
# forecaster's table covers gaps up to 12 and its drift pairs are recorded under the refresh-every-10 policy.
NEW_LONG = Plan(
    "long", 32, 16, 50, 8, 4,
    tuple(("forecast", 0.3, "eager", {"refresh_every": n, "num_steps": None}) for n in (4, 6, 8, 10, 12)),
    (),
    fora=(3, 5),
    taylorseer=tuple((i, o, "blocks") for i in (4, 6, 8, 10, 12) for o in (1, 2)),
    cachedit=((1, 1, 0.16, 1),),
    inductor_baseline=False,
    probe=False,
    calibration_max_gap=12,
    calibration_drift={"threshold": 0.3, "alpha": 0.05, "warmup_steps": 2, "refresh_every": 10},
)  # fmt: skip
PLANS = {("new", "default"): NEW_DEFAULT, ("new", "quick"): NEW_QUICK, ("new", "small"): NEW_SMALL}
PLANS[("new", "long")] = NEW_LONG
PLANS[("old", "default")] = OLD_DEFAULT
PLANS[("old", "quick")] = OLD_QUICK
