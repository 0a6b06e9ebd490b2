import pytest
import torch

import fastcache_compile as fc
from fastcache_compile import calibration
from models import CASES, TinyDiT, sample

CASE = CASES["handwritten"]


def _run(m):
    for seed in range(4):
        sample(m, CASE, steps=8, seed=seed)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    torch._dynamo.reset()
    model = CASE.build()
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    calib = fc.calibrate(model, _run, path)
    torch._dynamo.reset()
    return model, calib, path


def test_fit_contents(fitted):
    model, calib, path = fitted
    n = len(model.blocks)
    assert calib.fingerprint["num_blocks"] == n
    assert calib.fingerprint["widths"] == [[64]] * n
    assert set(calib.metrics["heldout_rel_error"]) == {"reuse", "trajectory", "linear", "direct"}
    assert calib.recommended == min(calib.metrics["heldout_rel_error"], key=calib.metrics["heldout_rel_error"].get)
    # the fitted maps are real fits, not their initial values
    assert any(abs(b) > 1e-3 for b in calib.metrics["beta"])
    assert calib.tensors["a.0.0"].shape == (64, 64) and calib.tensors["a.0.0"].abs().max() > 0
    assert calib.tensors["w.0.0"].shape == (64, 64) and calib.tensors["b.0.0"].shape == (64,)
    loaded = calibration.load(path)
    assert loaded.recommended == calib.recommended
    for key, value in calib.tensors.items():
        assert torch.equal(loaded.tensors[key], value)


@pytest.mark.parametrize("form", ["trajectory", "linear", "direct"])
def test_calibrated_forms_run_and_differ_from_reuse(fitted, form):
    model, _, path = fitted
    ref = sample(model, CASE, steps=8, seed=11)
    outs = {}
    for f in ("reuse", form):
        torch._dynamo.reset()
        options = {"threshold": 0.3, "lowering": "eager", "calibration": str(path), "approximation": f}
        cm = torch.compile(model, backend="fastcache", options=options)
        outs[f] = sample(cm, CASE, steps=8, seed=11)
        assert fc.stats(cm)["blocks_skipped"] > 0
    assert not torch.equal(outs[form], outs["reuse"])
    assert (outs[form] - ref).norm() / ref.norm() < 0.5


def test_calibration_of_another_model_is_rejected(fitted):
    _, _, path = fitted
    torch.manual_seed(123)
    other = TinyDiT().eval()  # same architecture, different weights
    cm = torch.compile(other, backend="fastcache", options={"lowering": "eager", "calibration": str(path)})
    with pytest.raises(Exception, match="calibration file does not belong to this model: param_hash"):
        sample(cm, CASE, steps=3)


def test_another_instance_served_by_the_same_graph_is_rejected(fitted):
    """Two instances of one class share Dynamo's graph: the second's first call is checked too,
    although the graph was built (and the file checked) for the first."""
    model, _, path = fitted
    torch.manual_seed(123)
    other = TinyDiT().eval().requires_grad_(False)  # same architecture, different weights
    options = {"lowering": "eager", "calibration": str(path), "threshold": 0.3, "approximation": "trajectory"}
    mine = torch.compile(model, backend="fastcache", options=options)
    theirs = torch.compile(other, backend="fastcache", options=options)
    sample(mine, CASE, steps=3)
    with pytest.raises(ValueError, match="does not belong to this model instance"):
        sample(theirs, CASE, steps=3)
    sample(mine, CASE, steps=3)  # the calibrated instance keeps working
    assert fc.stats(mine)["generations"] == 2 and fc.stats(mine)["graphs"] == 1


def test_missing_or_foreign_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        calibration.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a fastcache calibration file"):
        calibration.load(tmp_path / "foreign.safetensors")


def test_fitted_form_needs_calibration():
    model = TinyDiT().eval()
    cm = torch.compile(model, backend="fastcache", options={"approximation": "trajectory"})
    with pytest.raises(Exception, match="needs fitted maps"):
        sample(cm, CASE, steps=2)


def test_calibrate_needs_three_steps():
    model = TinyDiT().eval()
    with pytest.raises(ValueError, match="at least 3 steps"):
        fc.calibrate(model, lambda m: sample(m, CASE, steps=2))


def test_static_token_correction_is_fitted_and_used(fitted, tmp_path):
    model, calib, path = fitted
    w = calib.tensors["stack.w"]
    assert w.shape == (64, 64) and w.abs().max() > 0
    assert set(calib.metrics["static_token_heldout_rel_error"]) == {"reuse", "linear"}
    opts = dict(lowering="eager", threshold=0.0, token_select=True, token_threshold=0.1, approximation="linear")

    def tokens_run(calibration_file):
        torch._dynamo.reset()
        cm = torch.compile(model, backend="fastcache", options={**opts, "calibration": str(calibration_file)})
        out = sample(cm, CASE, steps=8, seed=9)
        assert min(fc.stats(cm)["tokens_per_call"]) < 16  # static tokens existed
        return out

    with_w = tokens_run(path)
    zeroed = calibration.load(path)
    zeroed.tensors["stack.w"] = torch.zeros_like(w)
    zero_path = tmp_path / "zero_w.safetensors"
    zeroed.save(zero_path)
    # identical up to the static-token correction: W_s = 0 reduces it to plain residual reuse
    assert not torch.equal(with_w, tokens_run(zero_path))
