"""The ``forecast`` skip path and the in-graph audit, wired by ``insert_cache`` (eager lowering)."""

import pytest
import torch
from torch import nn

import fastcache_compile as fc
from fastcache_compile.backend import _outlined
from fastcache_compile.passes import insert_cache, insert_recording
from fastcache_compile.passes.insert_cache import state_history
from fastcache_compile.runtime import shadow_errors
from models import CASES, sample

STEPS = 14


class PolyBlock(nn.Module):
    """y = x + c0 + c1 τ + c2 τ²  (τ = timestep / 10): the residual is quadratic in the step."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.randn(3, dim))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        tau = (timestep.float() / 10.0)[:, None, None]  # (B, 1, 1)
        return x + self.c[0] + self.c[1] * tau + self.c[2] * tau * tau


class PolyNet(nn.Module):
    def __init__(self, dim: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PolyBlock(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = 0.9 * block(x, timestep)
        return x


def _poly_sample(model, seed: int) -> torch.Tensor:
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(seed))
    for i in range(STEPS):
        t = torch.full((2,), float(STEPS - 1 - i))  # decreasing timestep: one generation
        x = x - 0.05 * model(x, t)
    return x


def _poly_model() -> PolyNet:
    torch.manual_seed(0)
    return PolyNet().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def poly(tmp_path_factory):
    torch._dynamo.reset()
    model = _poly_model()
    path = tmp_path_factory.mktemp("fc") / "poly.safetensors"
    calib = fc.calibrate(model, lambda m: [_poly_sample(m, s) for s in range(4)], path)
    torch._dynamo.reset()
    return model, calib, path


def _compiled(path, tau: float, conformal: bool = True):
    from benchmarks._forecast_backend import forecast_backend

    torch._dynamo.reset()
    return forecast_backend(path, tau, 0.1, conformal=conformal)


def test_quadratic_residual_is_forecast_exactly_end_to_end(poly):
    model, calib, path = poly
    assert calib.metrics["forecast_order"] == 3
    assert state_history("forecast", calib.block_params("forecast")) == 3
    ref = _poly_sample(model, seed=7)
    cm = torch.compile(model, backend=_compiled(path, tau=0.01))
    with shadow_errors() as errors:
        out = _poly_sample(cm, seed=7)
    skipped = fc.stats(cm)["blocks_skipped"]
    assert skipped >= 10  # most steps after the 3-compute history skip (at most max_gap − 1 in a row)
    assert len(errors) == skipped and max(e for _, e in errors) < 1e-4
    assert torch.allclose(out, ref, atol=1e-4)
    # the test can fail: plain reuse at the same skips is far off
    torch._dynamo.reset()
    reuse = torch.compile(model, backend="fastcache", options={"threshold": 10.0, "lowering": "eager"})
    assert (_poly_sample(reuse, seed=7) - ref).abs().max() > 1e-2


def test_state_started_mid_generation_refills_its_history(poly):
    """A non-contiguous first latent sends step 0 to one graph and the rest to another, whose state
    starts at step 1: its copies of r̂ are no history, so it computes 3 steps before forecasting."""
    model, _, path = poly
    x0 = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(7)).transpose(1, 2)
    options = {"approximation": "forecast", "calibration": str(path), "lowering": "eager"}
    cm = torch.compile(model, backend="fastcache", options={**options, "threshold": 0.05, "warmup_steps": 1})
    x = x0
    with shadow_errors() as errors:
        for i in range(STEPS):
            x = (x - 0.05 * cm(x, torch.full((2,), float(STEPS - 1 - i)))).contiguous()
    assert fc.stats(cm)["graphs"] == 2 and len(errors) >= 10
    # the residual is quadratic in the step: a real 3-step history forecasts it exactly (before the
    # fix, copies stamped with steps s − 1, s − 2 were extrapolated: errors up to 1.3)
    assert max(e for _, e in errors) < 1e-4


@pytest.mark.parametrize("conformal", [True, False])
def test_tau_zero_equals_uncached(poly, conformal):
    model, _, path = poly
    cm = torch.compile(model, backend=_compiled(path, tau=0.0, conformal=conformal))
    assert torch.equal(_poly_sample(cm, seed=3), _poly_sample(model, seed=3))
    assert fc.stats(cm)["blocks_skipped"] == 0


def test_state_history_refuses_missing_forecaster():
    with pytest.raises(ValueError, match="fit the forecaster"):
        state_history("forecast", {0: {"beta": torch.tensor(0.5)}})
    assert state_history("trajectory", None) == 2


def test_audit_equals_independent_shadow_computation():
    case = CASES["handwritten"]
    torch._dynamo.reset()
    model = case.build()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # per cached call: (computed, audit errors)
    shadows: list[list[tuple[int, float]]] = []

    def backend(gm, example_inputs):
        state: dict[str, object] = {}

        def call(*args):
            if "cached" not in state:
                state["init"] = insert_recording(_outlined(gm, args))
                state["cached"] = insert_cache(_outlined(gm, args), 0.3, 0.05, "reuse", audit=True)
            n_out = state["cached"].meta["fastcache_num_outputs"]
            step = torch.tensor(float(state.get("step", 0)))
            if "state" not in state:
                outs = list(state["init"](*args, step))
                state["state"] = outs[n_out:-1]
            else:
                with shadow_errors() as errs:
                    outs = list(state["cached"](*args, *state["state"], step, torch.tensor(False)))
                shadows.append(list(errs))
                audit, computed = outs.pop(), outs[-1]
                seen.append((computed, audit))
                state["state"] = outs[n_out:-1]
            state["step"] = state.get("step", 0) + 1
            return tuple(outs[:n_out]) if state["cached"].meta["fastcache_output_is_seq"] else outs[0]

        return call

    sample(torch.compile(model, backend=backend), case, steps=8, seed=5)
    assert seen and sum(int((~c).sum()) for c, _ in seen) > 0
    for (computed, audit), shadow in zip(seen, shadows):
        skipped = torch.nonzero(~computed).reshape(-1).tolist()
        assert [b for b, _ in shadow] == skipped  # the same blocks were skipped and audited
        assert torch.allclose(audit[skipped], torch.tensor([e for _, e in shadow]), rtol=1e-4, atol=1e-6)
        assert (audit[computed] == 0).all()


def test_calibrate_forced_order_and_wider_gap_table(tmp_path):
    """``forecast_orders`` forces K and ``forecast_max_gap`` widens the table: a block then skips up to
    max_gap − 1 steps in a row, after only K computed steps."""
    torch._dynamo.reset()
    model = _poly_model()
    path = tmp_path / "k2g6.safetensors"
    run = lambda m: [_poly_sample(m, s) for s in range(4)]  # noqa: E731
    calib = fc.calibrate(model, run, path, forecast_orders=(2,), forecast_max_gap=6)
    assert calib.metrics["forecast_order"] == 2 and calib.metrics["forecast_max_gap"] == 6
    assert set(calib.metrics["forecast_heldout_rel_error"]) == {"fitted_k2", "fixed_k2"}
    assert calib.tensors["fc_table.0"].shape == (36, 2)
    cm = torch.compile(model, backend=_compiled(path, tau=1e6, conformal=False))
    _poly_sample(cm, seed=7)
    # 14 steps: computes at 0, 1 (history), 7 and 13 (t − s_1 reached 6); 10 skips per block. A
    # 4-gap table would compute at 0, 1, 5, 9, 13: 9 skips.
    assert fc.stats(cm)["blocks_skipped"] == 3 * 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"forecast_orders": (4,)}, "forecast_orders"),
        ({"forecast_orders": ()}, "forecast_orders"),
        ({"forecast_orders": (2, 2)}, "forecast_orders"),
        ({"forecast_orders": 2}, "forecast_orders"),
        ({"forecast_max_gap": 17}, "forecast_max_gap"),
        ({"forecast_max_gap": True}, "forecast_max_gap"),
    ],
)
def test_calibrate_refuses_bad_forecaster_options_before_recording(kwargs, match):
    def run(m):
        raise AssertionError("options must be checked before the recording runs")

    with pytest.raises(ValueError, match=match):
        fc.calibrate(_poly_model(), run, **kwargs)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop("fc_coef.0"), r"missing forecaster tensor\(s\) \['fc_coef.0'\]"),
        (lambda t: t.pop("fc_err.1"), r"missing forecaster tensor\(s\) \['fc_err.1'\]"),
        (lambda t: t.update({"fc_table.0": t["fc_table.0"][:-1]}), "expected \\(max_gap\\*\\*K, K\\)"),
        (lambda t: t.update({"fc_coef.0": torch.zeros(3)}), "expected \\[4\\]"),
        (lambda t: t.update({"fc_pred.0": t["fc_pred.0"][:-1]}), "two 1-D tensors of one length"),
    ],
)
def test_incomplete_forecaster_in_a_file_is_refused_at_load(poly, tmp_path, edit, match):
    """Without its error model a block skipped on a constant prediction in eager and failed in-graph."""
    from fastcache_compile import calibration

    _, calib, _ = poly
    broken = calibration.Calibration(calib.fingerprint, dict(calib.tensors), calib.recommended, calib.metrics)
    edit(broken.tensors)
    broken.save(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=match):
        calibration.load(tmp_path / "broken.safetensors")
