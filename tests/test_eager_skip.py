"""Eager lowering decides on the host (``passes/eager_skip.py``): it must decide and predict as the
in-graph path (``CachedBlock._decide`` + ``cond``) does."""

import math

import pytest
import torch
from test_forecast_graph import _poly_model, _poly_sample

import fastcache_compile as fc
from fastcache_compile import conformal, forecast
from fastcache_compile.passes import cached_block, eager_skip


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory):
    torch._dynamo.reset()
    path = tmp_path_factory.mktemp("fc") / "poly.safetensors"
    fc.calibrate(_poly_model(), lambda m: [_poly_sample(m, s) for s in range(4)], path)
    torch._dynamo.reset()
    return path


def test_pattern_row_matches_the_tensor_index():
    gen = torch.Generator().manual_seed(0)
    for max_gap in (1, 3, 5):
        for _ in range(50):
            gaps = torch.randint(1, 9, (3,), generator=gen).float()  # beyond max_gap: clamped
            steps = (30.0 - gaps.cumsum(0)).tolist()
            want = int(forecast.pattern_index(gaps, max_gap))
            assert eager_skip.pattern_row(30.0, steps, max_gap) == want


@pytest.mark.parametrize("delta2", [0.0, 1e-20, 3e-4, 0.7, math.inf, math.nan])
@pytest.mark.parametrize("gap", [0.0, 1.0, 4.0])
def test_predicted_error_matches_the_tensor_model(delta2, gap):
    coef = torch.tensor([-1.5, 0.45, 0.3, -0.02])
    want = conformal.predict_error(
        coef, conformal.error_features(torch.tensor(delta2), torch.tensor(gap), torch.tensor(7.0))
    )
    got = eager_skip.predicted_error(coef.tolist(), delta2, gap, 7.0)
    assert math.isclose(got, float(want), rel_tol=1e-5)


def test_weighted_sum_matches_forecast():
    gen = torch.Generator().manual_seed(1)
    x, *res = (torch.randn(2, 5, 4, generator=gen) for _ in range(4))
    w = torch.tensor([1.7, -0.9, 0.2])
    assert torch.allclose(eager_skip.weighted_sum(x, res, w.tolist()), forecast.forecast(x, res, w), atol=1e-6)


def test_host_tables_follow_replaced_buffers():
    tables = eager_skip.HostTables()
    a, c = torch.ones(4, 3), torch.zeros(4)
    assert tables.update(a, c).rows[0] == [1.0, 1.0, 1.0]
    assert tables.update(a * 2, c).rows[0] == [2.0, 2.0, 2.0]  # a new tensor (``.to``) is read again


def _run(calib_path, options, traced: bool, monkeypatch) -> tuple[torch.Tensor, list, int]:
    """Samples, per-step computed flags, and skips of the eager backend; ``traced`` sends every call
    through the in-graph decision and ``cond`` instead of the host path."""
    torch._dynamo.reset()
    with monkeypatch.context() as m:
        if traced:
            m.setattr(cached_block, "_tracing", lambda _flat: True)
        model = _poly_model()
        opts = {"approximation": "forecast", "calibration": str(calib_path), "lowering": "eager", **options}
        cm = torch.compile(model, backend="fastcache", options=opts)
        decisions = []
        real = cached_block.CachedBlock.forward

        def spy(self, *flat):
            out = real(self, *flat)
            decisions.append(bool(out[len(self.layout.pairs) + self.layout.num_state]))
            return out

        m.setattr(cached_block.CachedBlock, "forward", spy)
        out = torch.cat([_poly_sample(cm, seed) for seed in (11, 12)])
        return out, decisions, fc.stats(cm)["blocks_skipped"]


@pytest.mark.parametrize(
    "options",
    [
        {"threshold": 0.02},  # conformal rule, tight
        {"threshold": 0.5, "max_skips": 2},  # loose, with the cap
        {"threshold": 0.3, "refresh_every": 4},
    ],
)
def test_host_path_decides_and_predicts_as_the_graph(calib_path, options, monkeypatch):
    host, host_decisions, host_skips = _run(calib_path, options, traced=False, monkeypatch=monkeypatch)
    graph, graph_decisions, graph_skips = _run(calib_path, options, traced=True, monkeypatch=monkeypatch)
    assert host_skips > 0  # the comparison covers skipped blocks
    assert host_decisions == graph_decisions and host_skips == graph_skips
    assert torch.allclose(host, graph, atol=1e-5)
