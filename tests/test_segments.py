"""The segment lowering (static segments, host dispatch) equals the in-graph cond form.

Both forms are built from the same captured graph of every test family and driven with the same
inputs, state, steps and forcing; they must take the same decisions and give the same outputs and
state. Then: the runner as a drop-in ``Variant.cached`` (stats and audit through the runtime), one
Inductor-per-segment run, the ONNX segment export (checker, ONNX Runtime, no ``If``), and the TensorRT
builder's API names.
"""

import ast
import inspect
from pathlib import Path

import pytest
import torch

import fastcache_compile as fc
import fastcache_compile.backend as backend_mod
import fastcache_compile.segments as segments_mod
from fastcache_compile.backend import _outlined
from fastcache_compile.passes import insert_cache, insert_recording
from fastcache_compile.passes.segments import split_segments
from fastcache_compile.runtime import shadow_errors
from fastcache_compile.segments import SegmentRunner, eager, inductor
from models import CASES, TinyDiT, compile_eager, sample, split_inputs

ALPHA = 0.05


def _capture(case, model):
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    x, cond = split_inputs(case.make_inputs(1, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        case.step_call(torch.compile(model, backend=grab, fullgraph=True), x, case.to_timestep(1.0), cond)
    (gm, args), latent = graphs[0], x
    torch._dynamo.reset()
    return gm, args, latent


@pytest.fixture(scope="module")
def captured(built):
    return {name: _capture(CASES[name], built[name]) for name in CASES}


def _drive(gm, args, latent, tau, schedule):
    """Run cond and segment forms side by side; per step (scale of the latent change, force)."""
    cond = insert_cache(_outlined(gm, args), tau, ALPHA)
    program = split_segments(_outlined(gm, args), tau, ALPHA)
    seg = SegmentRunner(program)
    init = insert_recording(_outlined(gm, args))
    n = cond.meta["fastcache_num_outputs"]
    pos = next(
        i for i, a in enumerate(args) if a is latent or (isinstance(a, torch.Tensor) and a.shape == latent.shape)
    )
    gen = torch.Generator().manual_seed(1)
    flags = []
    with torch.no_grad():
        first = init(*args, torch.tensor(0.0))
        # each form owns its state, as each stream slot does (eager caching writes it in place)
        state_c, state_s = list(first[n:-1]), [s.clone() for s in first[n:-1]]
        x = args[pos]
        for step, (scale, force) in enumerate(schedule, start=1):
            x = x + scale * torch.randn(x.shape, generator=gen)
            a = [*args[:pos], x, *args[pos + 1 :]]
            extra = (torch.tensor(float(step)), torch.tensor(force))
            oc, os_ = cond(*a, *state_c, *extra), seg(*a, *state_s, *extra)
            assert len(oc) == len(os_)
            assert torch.equal(oc[-1], os_[-1]), f"step {step}: decisions differ"
            for c, s in zip(oc[:-1], os_[:-1]):
                assert torch.equal(c, s)  # same ops in the same order: bitwise equal in eager
            flags.append(oc[-1].tolist())
            state_c, state_s = list(oc[n:-1]), list(os_[n:-1])
    return flags, program


def _has_cond(program) -> bool:
    return any(
        node.target is torch.ops.higher_order.cond
        for gm in program.modules.values()
        for sub in gm.modules()
        if isinstance(sub, torch.fx.GraphModule)
        for node in sub.graph.nodes
    )


@pytest.mark.parametrize("name", list(CASES))
def test_segments_equal_cond_form(captured, name):
    gm, args, latent = captured[name]
    # Forced schedule at τ = 10: a forced step computes every block, any other step skips every block.
    schedule = [(0.01, True), (0.01, False), (0.01, False), (0.01, True), (0.01, False)]
    flags, program = _drive(gm, args, latent, 10.0, schedule)
    assert flags == [[force] * len(program.blocks) for _, force in schedule]
    assert not _has_cond(program)
    # τ = 0.3 with small and large latent changes: the χ² test skips some blocks and computes others.
    schedule = [(0.001, False), (2.0, False), (0.001, False), (0.001, False), (2.0, False)]
    flags, _ = _drive(gm, args, latent, 0.3, schedule)
    every = [f for step in flags for f in step]
    assert any(every) and not all(every)


def _segments_backend(monkeypatch, lower):
    """``lowering="segments"`` with another per-segment lowering (eager, for bitwise comparison with the
    eager cond form): the runtime's Variant.cached becomes a SegmentRunner."""

    def build(gm, tau, alpha, form="reuse", params=None, audit=False, max_skips=None):
        assert not audit and max_skips is None
        return SegmentRunner(split_segments(gm, tau, alpha, form, params), lower)

    monkeypatch.setattr(backend_mod, "insert_cache", build)


def test_drop_in_runtime_same_stats_and_audit(built, monkeypatch):
    case = CASES["handwritten"]
    options = {"threshold": 0.3, "warmup_steps": 1}
    ref_model = compile_eager(built["handwritten"], **options)
    with shadow_errors() as ref_errors:
        ref = sample(ref_model, case, cfg="split", steps=8)
    ref_stats = fc.stats(ref_model)
    torch._dynamo.reset()
    _segments_backend(monkeypatch, eager)
    seg_model = compile_eager(case.build(), **options)  # same weights, its own runtime state
    with shadow_errors() as errors:
        out = sample(seg_model, case, cfg="split", steps=8)
    stats = fc.stats(seg_model)
    assert stats["blocks_skipped"] > 0
    for key in ("calls", "blocks_computed", "blocks_skipped", "per_block_skipped"):
        assert stats[key] == ref_stats[key], key
    assert torch.equal(out, ref)
    assert errors == ref_errors  # the audit sees the same skips with the same true errors


def test_inductor_per_segment(monkeypatch):
    model = TinyDiT(dim=32, depth=2, heads=2).eval()
    case = CASES["handwritten"]
    options = {"threshold": 0.3, "warmup_steps": 1}
    ref_model = compile_eager(model, **options)
    ref = sample(ref_model, case, cfg=None, steps=6)
    ref_skipped = fc.stats(ref_model)["per_block_skipped"]  # read before the reset drops its graphs
    torch._dynamo.reset()
    lowered = []

    def counting(gm, example_inputs):
        lowered.append(gm)
        return inductor(gm, example_inputs)

    # the real option: the backend builds the segment program and lowers each segment with Inductor
    monkeypatch.setattr(segments_mod, "inductor", counting)
    seg_model = torch.compile(model, backend="fastcache", options={"lowering": "segments", **options}, fullgraph=True)
    out = sample(seg_model, case, cfg=None, steps=6)
    assert lowered  # the segments went through the per-segment lowering
    assert fc.stats(seg_model)["per_block_skipped"] == ref_skipped
    assert fc.stats(seg_model)["blocks_skipped"] > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert len(lowered) == len({id(g) for g in lowered})  # each segment compiled once: no recompiles


def test_bad_graph_is_a_value_error():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="outline_blocks"):
        split_segments(gm, 0.1, ALPHA)


# ---------------------------------------------------------------------------- ONNX and TensorRT

_TRT11_REMOVED = {
    # weakly typed precision flags (TensorRT 11 builds strongly typed networks only)
    ("BuilderFlag", "FP16"),
    ("BuilderFlag", "BF16"),
    ("BuilderFlag", "INT8"),
    ("BuilderFlag", "FP8"),
    ("BuilderFlag", "INT4"),
    ("BuilderFlag", "STRICT_TYPES"),
    ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"),
    ("BuilderFlag", "PREFER_PRECISION_CONSTRAINTS"),
    ("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"),
}
_TRT10_REMOVED_CALLS = {"build_engine", "max_workspace_size", "execute_async_v2", "set_flag"}


def test_tensorrt_builder_uses_no_removed_api():
    from fastcache_compile.export import tensorrt_segments

    tree = ast.parse(Path(inspect.getsourcefile(tensorrt_segments)).read_text())
    pairs, attrs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attrs.add(node.attr)
            if isinstance(node.value, ast.Attribute):
                pairs.add((node.value.attr, node.attr))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isupper():
            attrs.add(node.value)  # getattr(trt.X, "NAME") spelled as a string
    assert not pairs & _TRT11_REMOVED
    assert not attrs & (_TRT10_REMOVED_CALLS | {"FP16", "BF16", "EXPLICIT_BATCH"})
    assert "STRONGLY_TYPED" in attrs and "build_serialized_network" in attrs


def test_tensorrt_missing_is_a_clear_import_error(tmp_path):
    from fastcache_compile.export import tensorrt_segments

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="TensorRT"):
            tensorrt_segments.build_engine(tmp_path / "x.onnx")
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        gm = torch.fx.symbolic_trace(torch.nn.Identity())
        with pytest.raises(ImportError, match="torch-tensorrt"):
            tensorrt_segments.tensorrt_lowering(gm, [torch.zeros(1)])
    else:
        pytest.skip("torch-tensorrt is installed: benchmarks/gpu_check.py exercises it")


def test_onnx_segments_match_and_hold_no_if(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fastcache_compile.export.segments_onnx import export_segments, load_segments

    model = TinyDiT(dim=32, depth=2, heads=2).eval()
    case = CASES["handwritten"]
    x, cond = split_inputs(case.make_inputs(1, torch.Generator().manual_seed(0)))
    options = {"threshold": 0.3, "warmup_steps": 1}
    # verify=True runs every segment (both sides of each block) under ONNX Runtime CPU against torch.
    export_segments(model, {"x": x, "t": torch.tensor([999]), **cond}, tmp_path, verify=True, **options)
    files = sorted(tmp_path.glob("seg_*.onnx"))
    assert len(files) == 3 * 2 + 1  # pre / compute / predict per block, post
    for f in [*files, tmp_path / "init_0.onnx"]:
        onnx.checker.check_model(str(f), full_check=True)
        proto = onnx.load(str(f))
        ops = {n.op_type for n in proto.graph.node} | {n.op_type for fn in proto.functions for n in fn.node}
        assert "If" not in ops, f.name
    for baked in ({"threshold": 0.0}, {"max_skips": 1}, {"audit": True}):  # constants of the segment graphs
        with pytest.raises(ValueError, match="cannot override"):
            load_segments(tmp_path, **baked)
    runner = load_segments(tmp_path)
    # load_exported reads the layout from the manifest and gives the same segment runner
    assert type(fc.load_exported(tmp_path)) is type(runner)
    out = sample(runner, case, batch=1, cfg="split", steps=8)
    ref_model = compile_eager(model, **options)
    ref = sample(ref_model, case, batch=1, cfg="split", steps=8)
    mine, theirs = runner.stats(), fc.stats(ref_model)
    assert mine["blocks_skipped"] > 0
    for key in ("calls", "blocks_computed", "blocks_skipped", "per_block_skipped"):
        assert mine[key] == theirs[key], key
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
