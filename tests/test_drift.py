"""``calibrate(..., drift=options)``: conformal pairs observed under caching tighten the cutoff."""

import pytest
import torch

import fastcache_compile as fc
from fastcache_compile.calibration import load
from fastcache_compile.runtime import shadow_errors
from models import CASES, sample

TAU = 0.3
DRIFT = {"threshold": TAU, "warmup_steps": 1}


def _runs(seeds):
    case = CASES["dit"]
    return lambda m: [sample(m, case, batch=1, cfg="split", steps=8, seed=s) for s in seeds]


def _skips(model, path, seeds) -> tuple[int, list[float]]:
    torch._dynamo.reset()
    options = {"lowering": "eager", "approximation": "forecast", "calibration": str(path), **DRIFT}
    cm = torch.compile(model, backend="fastcache", options=options)
    with shadow_errors() as errors:
        _runs(seeds)(cm)
    return fc.stats(cm)["blocks_skipped"], sorted(e for _, e in errors)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    torch._dynamo.reset()
    model = CASES["dit"].build()
    d = tmp_path_factory.mktemp("drift")
    plain, drifted = d / "plain.safetensors", d / "drift.safetensors"
    fc.calibrate(model, _runs(range(4)), plain)
    calib = fc.calibrate(model, _runs(range(4)), drifted, drift=DRIFT, drift_run=_runs(range(10, 14)))
    torch._dynamo.reset()
    return model, plain, drifted, calib


def test_drift_pass_records_every_skip_of_the_deployed_policy(calibrated):
    """The pass's pairs are exactly the skips (and true errors) of the plain calibration deployed on
    the drift seeds, as an independent shadow run measures them."""
    model, plain, _, calib = calibrated
    info = calib.metrics["forecast_drift"]
    skips, errors = _skips(model, plain, range(10, 14))
    assert info["skips"] == skips > 0
    recorded = sorted(float(e) for name, t in calib.tensors.items() if name.startswith("fc_derr.") for e in t)
    assert recorded == pytest.approx(errors, rel=1e-5)
    assert info["violation_rate"] == pytest.approx(sum(e > TAU for e in errors) / len(errors))


def test_drift_pairs_can_only_tighten_the_cutoff(calibrated, tmp_path):
    model, plain, drifted, _ = calibrated
    seeds = range(20, 23)
    assert _skips(model, drifted, seeds)[0] <= _skips(model, plain, seeds)[0]
    # pairs that all violate τ leave no passing cutoff: the block never skips
    bad = load(drifted)
    bad.tensors = {k: (v * 0 + 10.0 if k.startswith("fc_derr.") else v) for k, v in bad.tensors.items()}
    bad.save(tmp_path / "bad.safetensors")
    assert _skips(model, tmp_path / "bad.safetensors", seeds)[0] == 0


def test_drift_options_are_checked_before_recording():
    model = CASES["dit"].build()
    with pytest.raises(ValueError, match="at least the threshold"):
        fc.calibrate(model, _runs(range(2)), drift={"num_steps": 8})
    with pytest.raises(ValueError, match="drift options may only be"):
        fc.calibrate(model, _runs(range(2)), drift={"threshold": 0.1, "lowering": "inductor"})
    ran: list[int] = []
    with pytest.raises(ValueError, match="threshold must be a float >= 0"):
        fc.calibrate(model, lambda m: ran.append(1), drift={"threshold": -0.1})
    assert not ran  # refused before the recording pass


def test_drift_options_are_stored_normalised():
    """A range of refresh steps is accepted like a tuple and stored as one: the file's metrics are JSON
    (a raw range failed to save after both recording passes)."""
    import json

    from fastcache_compile.drift import check_options

    got = check_options({"threshold": 0.2, "refresh_steps": range(0, 20, 5), "num_steps": 20})
    assert got == {"threshold": 0.2, "refresh_steps": (0, 5, 10, 15), "num_steps": 20}
    json.dumps(got)
