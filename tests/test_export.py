"""ONNX export + ONNX Runtime runner reproduce the backend: same outputs, same per-block skips."""

import json
import shutil

import numpy as np
import pytest
import torch

import fastcache_compile as fc
from fastcache_compile.cli import main
from fastcache_compile.export import export_onnx, export_tensorrt, load_exported
from models import CASES, TinyDiT, sample, split_inputs

pytest.importorskip("onnx", reason="ONNX export needs onnx (pip install 'fastcache-compile[onnx]')")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (pip install 'fastcache-compile[onnx]')")
pytest.importorskip("onnxruntime", reason="the exported-model runner needs onnxruntime (pip install onnxruntime)")

NAMES = ["dit", "pixart"]
TAU = 0.3  # large enough that tiny random models skip blocks within 8 steps
STEPS = 8
OPTIONS = {"warmup_steps": 1}


def _example(name: str) -> dict:
    case = CASES[name]
    x, cond = split_inputs(case.make_inputs(1, torch.Generator().manual_seed(0)))
    return {"hidden_states": x, "timestep": torch.tensor([999]), **cond, "return_dict": False}


@pytest.fixture(scope="module")
def built():
    return {name: CASES[name].build() for name in NAMES}


@pytest.fixture(scope="module")
def exported(built, calibration, tmp_path_factory):
    """Export directories: every case at τ > 0 (checked under ORT at export time) and the DiT at τ = 0.

    Exports dominate this file's run time (~5 s per graph on a loaded 2-core machine), hence one τ = 0 export.
    """
    out = {}
    for name, tau in [("pixart", TAU), ("dit", 0.0)]:
        path = tmp_path_factory.mktemp(f"{name}-{tau}")
        out[name, tau] = export_onnx(built[name], _example(name), path, threshold=tau, verify=tau > 0, **OPTIONS)
    # The DiT at τ > 0 goes through the command line (module:factory form) with fitted maps, end to end.
    path = tmp_path_factory.mktemp(f"dit-{TAU}")
    argv = ["export", "--model", "test_export:dit_factory", "--out", str(path), "--threshold", str(TAU)]
    argv += ["--warmup-steps", str(OPTIONS["warmup_steps"]), "--calibration", calibration]
    assert main([*argv, "--approximation", "trajectory"]) == 0
    out["dit", TAU] = path
    return out


@pytest.fixture(scope="module")
def calibration(built, tmp_path_factory):
    """Fitted trajectory maps of the DiT: the skip branch then reads constants, not just its operands."""
    path = tmp_path_factory.mktemp("calib") / "dit.safetensors"
    case = CASES["dit"]
    fc.calibrate(built["dit"], lambda m: [sample(m, case, batch=1, cfg="split", steps=4, seed=s) for s in (1, 2)], path)
    return str(path)


def _backend_options(name: str, calibration: str) -> dict:
    extra = {"calibration": calibration, "approximation": "trajectory"} if name == "dit" else {}
    return {"lowering": "eager", "threshold": TAU, **OPTIONS, **extra}


def dit_factory():
    """``fastcache export --model test_export:dit_factory``: (model, example kwargs)."""
    return CASES["dit"].build(), _example("dit")


@pytest.mark.parametrize(
    ("name", "tau", "overrides"),
    [
        ("dit", 0.0, {}),  # τ = 0 baked into the graph: the χ² test never passes
        ("pixart", TAU, {"warmup_steps": STEPS}),  # τ > 0 graph, every step forced by the runtime
        ("pixart", TAU, {"refresh_steps": tuple(range(STEPS))}),  # the same, by a refresh schedule
    ],
)
def test_all_computed_matches_uncached(built, exported, name, tau, overrides):
    ref = sample(built[name], CASES[name], batch=1, cfg="split", steps=STEPS)
    runner = load_exported(exported[name, tau], **overrides)
    out = sample(runner, CASES[name], batch=1, cfg="split", steps=STEPS)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    st = runner.stats()
    # cond and uncond are called separately: 2 calls per step, one generation (streams are not generations)
    assert st["blocks_skipped"] == 0 and st["calls"] == 2 * STEPS and st["generations"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_skips_match_backend(built, exported, calibration, name):
    case = CASES[name]
    options = _backend_options(name, calibration)
    compiled = torch.compile(built[name], backend="fastcache", options=options, fullgraph=True)
    ref = sample(compiled, case, batch=1, cfg="split", steps=STEPS)
    runner = load_exported(exported[name, TAU])
    out = sample(runner, case, batch=1, cfg="split", steps=STEPS)
    mine, theirs = runner.stats(), fc.stats(compiled)
    assert mine["blocks_skipped"] > 0
    for key in ("calls", "generations", "blocks_computed", "blocks_skipped", "per_block_skipped", "skip_ratio"):
        assert mine[key] == theirs[key], key
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # A second sampling run is a new generation (the timestep jumps back up): same result again.
    again = sample(runner, case, batch=1, cfg="split", steps=STEPS)
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert runner.stats()["generations"] == 2
    runner.reset()
    assert runner.stats()["calls"] == 0


def test_manifest_records_layout_and_roles(exported):
    manifest = json.loads((exported["dit", TAU] / "manifest.json").read_text())
    assert manifest["config"]["approximation"] == "trajectory"
    assert (exported["dit", TAU] / manifest["calibration"]["file"]).exists()  # copy of the fitted maps
    manifest = json.loads((exported["pixart", TAU] / "manifest.json").read_text())
    assert manifest["config"]["threshold"] == TAU and manifest["config"]["approximation"] == "reuse"
    variant = manifest["variants"][0]
    roles = {i["name"]: i["role"] for i in variant["inputs"]}
    assert roles == {
        "hidden_states": "latent",
        "timestep": "timestep",
        "encoder_hidden_states": "conditioning",
        "encoder_attention_mask": "conditioning",
    }
    assert len(variant["blocks"]) == manifest["fingerprint"]["num_blocks"] == 2
    assert all(b["chi2_threshold"] > 0 for b in variant["blocks"])


def test_numpy_inputs_and_output_kinds(exported):
    runner = load_exported(exported["dit", TAU])
    kwargs = _example("dit")
    want = runner(**kwargs)[0]
    runner.reset()
    as_numpy = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    got = runner(**as_numpy)
    assert isinstance(got, tuple) and isinstance(got[0], np.ndarray)
    np.testing.assert_allclose(got[0], want.numpy(), rtol=0, atol=0)
    runner.reset()
    obj = runner(**{k: v for k, v in kwargs.items() if k != "return_dict"})  # diffusers' default
    torch.testing.assert_close(obj.sample, want, rtol=0, atol=0)


def test_rejects_wrong_manifest_model_and_calls(built, exported, tmp_path):
    src = exported["dit", TAU]
    manifest = json.loads((src / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 999}))
    with pytest.raises(ValueError, match="version 999"):
        load_exported(tmp_path)
    with pytest.raises(ValueError, match="param_hash"):
        load_exported(src, model=_perturbed())
    load_exported(src, model=built["dit"])  # the exported model itself passes the check
    with pytest.raises(ValueError, match="runtime options"):
        load_exported(src, threshold=0.1)
    runner = load_exported(src)
    kwargs = _example("dit")
    with pytest.raises(ValueError, match="no exported graph for input shapes"):
        runner(**{**kwargs, "hidden_states": torch.zeros(2, 4, 8, 8), "timestep": torch.tensor([9, 9])})
    with pytest.raises(ValueError, match="exported with"):
        runner(**kwargs, cross_attention_kwargs={"scale": 1.0})


def _perturbed() -> torch.nn.Module:
    other = CASES["dit"].build()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    return other


def test_cli_rejects_bad_model_spec(tmp_path):
    with pytest.raises(SystemExit, match="module:factory"):
        main(["export", "--model", "no-colon", "--out", str(tmp_path)])


def test_tensorrt_missing_is_a_clear_import_error(exported, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="TensorRT"):
            export_tensorrt(exported["dit", TAU], tmp_path)
        # The command line says so before spending time on the ONNX export.
        assert main(["export", "--format", "tensorrt", "--model", "reference", "--out", str(tmp_path)]) == 2
        assert "TensorRT" in capsys.readouterr().err
    else:
        pytest.skip("tensorrt is installed: see test_tensorrt_engines")


def test_tensorrt_engines(exported, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (and needs an NVIDIA GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need an NVIDIA GPU")
    out = export_tensorrt(exported["dit", TAU], tmp_path)
    assert (out / "cached_0.engine").stat().st_size > 0
    shutil.rmtree(out)


# -- issue 9, item 10: example inputs, Dynamo state, damaged exports -----------------------------------


def _tiny_call(batch: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.full((batch,), 0.5), torch.arange(batch)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyDiT(depth=2).eval()


@pytest.fixture(scope="module")
def tiny_exported(tiny, tmp_path_factory):
    """The tiny DiT exported from a positional call (batch 1) and a keyword call (batch 2)."""
    one, (x, t, y) = _tiny_call(1, 1), _tiny_call(2, 2)
    path = tmp_path_factory.mktemp("tiny")
    return export_onnx(tiny, [one, {"x": x, "t": t, "y": y}], path, threshold=0.0, verify=False)


def test_positional_examples_and_several_signatures(tiny, tiny_exported, tmp_path):
    one, two = _tiny_call(1, 1), _tiny_call(2, 2)
    x, t, y = two
    runner = load_exported(tiny_exported)
    with torch.no_grad():
        torch.testing.assert_close(runner(*one), tiny(*one), rtol=1e-4, atol=1e-4)
        runner.reset()
        torch.testing.assert_close(runner(x, t=t, y=y), tiny(*two), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="both by position and by keyword"):
        runner(x, x=x, t=t, y=y)
    with pytest.raises(ValueError, match="a list of tensors"):
        export_onnx(tiny, list(one), tmp_path / "bad")
    with pytest.raises(ValueError, match=r"4 positional arguments .* at most 3"):
        export_onnx(tiny, (*one, 1), tmp_path / "bad")


def test_export_after_compile_at_other_batch_sizes(tiny, tmp_path):
    compiled = torch.compile(tiny, backend="fastcache", options={"lowering": "eager"})
    with torch.no_grad():
        for batch in (3, 4):  # two sizes: Dynamo's automatic dynamic shapes now trace this forward symbolically
            compiled(*_tiny_call(batch, 0))
    x, t, y = _tiny_call(2, 3)
    out = export_onnx(tiny, {"x": x, "t": t, "y": y}, tmp_path, threshold=0.0, verify=False)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(x=x, t=t, y=y), tiny(x, t, y), rtol=1e-4, atol=1e-4)


def test_damaged_exports_fail_at_load(tiny_exported, tmp_path):
    src = tiny_exported

    def copy(name: str):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst, json.loads((dst / "manifest.json").read_text())

    d, manifest = copy("no-key")
    del manifest["variants"][0]["blocks"][1]["state"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['state'\] in variants\[0\]\.blocks\[1\]"):
        load_exported(d)
    d, manifest = copy("no-config")
    del manifest["config"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['config'\]"):
        load_exported(d)
    d, manifest = copy("truncated")
    graph = d / manifest["variants"][0]["cached"]
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cached_0.onnx has 1000 bytes but was exported with \d+"):
        load_exported(d)
    d, manifest = copy("missing")
    (d / manifest["variants"][0]["init"]).unlink()
    with pytest.raises(ValueError, match=r"lacks init_0\.onnx"):
        load_exported(d)
    d, manifest = copy("old")  # written before file sizes were recorded: the graphs must still be there
    del manifest["files"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    load_exported(d)
    (d / manifest["variants"][0]["cached"]).unlink()
    with pytest.raises(ValueError, match=r"lacks cached_0\.onnx"):
        load_exported(d)
    (d / "manifest.json").write_text(json.dumps(manifest)[:100])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_exported(d)


def test_forecast_form_exports_with_its_rule(built, tmp_path):
    """The fitted forecaster (K residuals of state, weight table per gap pattern) and its conformal rule
    are graph constants of the export; the ONNX runner reproduces the backend's skips and outputs."""
    case, model = CASES["dit"], built["dit"]
    path = str(tmp_path / "forecast.safetensors")
    runs = lambda m: [sample(m, case, batch=1, cfg="split", steps=8, seed=s) for s in range(4)]  # noqa: E731
    calib = fc.calibrate(model, runs, path)
    assert calib.metrics["forecast_order"] >= 1
    torch._dynamo.reset()
    options = {"threshold": TAU, **OPTIONS, "calibration": path, "approximation": "forecast"}
    out_dir = export_onnx(model, _example("dit"), tmp_path / "export", verify=True, **options)  # both If sides
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["config"]["approximation"] == "forecast"
    blocks = manifest["variants"][0]["blocks"]
    assert {b["history"] for b in blocks} == {calib.metrics["forecast_order"]}
    assert {b["rule"] for b in blocks} == {"conformal"} and any(b["conformal_cutoff"] is not None for b in blocks)
    compiled = torch.compile(model, backend="fastcache", options={"lowering": "eager", **options}, fullgraph=True)
    ref = sample(compiled, case, batch=1, cfg="split", steps=STEPS)
    runner = load_exported(out_dir)
    out = sample(runner, case, batch=1, cfg="split", steps=STEPS)
    assert runner.stats()["blocks_skipped"] > 0
    assert runner.stats()["per_block_skipped"] == fc.stats(compiled)["per_block_skipped"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
