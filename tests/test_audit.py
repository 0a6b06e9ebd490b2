"""``options={"audit": True}`` through the backend: stats(m)["audit"] against an independent shadow run,
and the forecast form selected by name (eager lowering)."""

import pytest
import torch

import fastcache_compile as fc
from fastcache_compile.runtime import shadow_errors
from models import CASES, compile_eager, sample

STEPS = 8
TAU = 0.2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch._dynamo.reset()
    case = CASES["handwritten"]
    model = case.build()
    path = tmp_path_factory.mktemp("fc") / "tiny.safetensors"
    fc.calibrate(model, lambda m: [sample(m, case, steps=STEPS, seed=s) for s in range(4)], path)
    torch._dynamo.reset()
    return case, model, path


@pytest.mark.parametrize("form", ["trajectory", "forecast"])
def test_audit_counts_equal_shadow(tiny, form) -> None:
    case, model, path = tiny
    opts = {"threshold": TAU, "calibration": str(path), "approximation": form, "warmup_steps": 2}
    audited = compile_eager(model, audit=True, **opts)
    out_audited = sample(audited, case, steps=STEPS, seed=7)
    audit = fc.stats(audited)["audit"]
    skipped = fc.stats(audited)["blocks_skipped"]
    torch._dynamo.reset()

    # Independent: the same skips, each recomputed by the benchmark shadow hook after the branch.
    plain = compile_eager(model, **opts)
    with shadow_errors() as errors:
        out_plain = sample(plain, case, steps=STEPS, seed=7)
    assert skipped > 0 and audit["skips"] == skipped == len(errors)
    torch.testing.assert_close(out_audited, out_plain)  # auditing changes no output
    assert audit["violations"] == sum(e > TAU for _, e in errors)
    assert audit["max_error"] == pytest.approx(max(e for _, e in errors), rel=1e-4, abs=1e-6)
    assert audit["mean_error"] == pytest.approx(sum(e for _, e in errors) / len(errors), rel=1e-4, abs=1e-6)


def test_forecast_at_tau_zero_equals_uncached(tiny) -> None:
    case, model, path = tiny
    ref = sample(model, case, steps=STEPS, seed=3)
    compiled = compile_eager(model, threshold=0.0, calibration=str(path), approximation="forecast")
    torch.testing.assert_close(sample(compiled, case, steps=STEPS, seed=3), ref, rtol=1e-5, atol=1e-5)
    assert fc.stats(compiled)["blocks_skipped"] == 0


def test_audit_refused_beside_token_options() -> None:
    with pytest.raises(ValueError, match="audit=True covers block-level caching only"):
        fc.FastCacheConfig(audit=True, token_select=True)


def test_state_bytes_worked_by_hand() -> None:
    # TinyDiT defaults: 8×8 input, patch 2 → N = 16 tokens, D = 64, 4 blocks. One stream of batch 2 keeps
    # per block x̂, r̂, r̂′ of (2, 16, 64) float32 plus the steps s, s′ (two float32 scalars).
    case = CASES["handwritten"]
    compiled = compile_eager(case.build(), threshold=0.1)
    sample(compiled, case, batch=2, steps=4, cfg=None)
    per_block = 3 * 2 * 16 * 64 * 4 + 2 * 4
    assert fc.stats(compiled)["state_bytes"] == 4 * per_block
    fc.reset(compiled)
    assert fc.stats(compiled)["state_bytes"] == 0
