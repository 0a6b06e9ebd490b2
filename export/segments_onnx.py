"""Export the segment form: one ONNX graph per static segment (no ``If``) plus the manifest.

    export_segments(model, example_kwargs, "out/dit-seg", threshold=0.1)   # init_<k>.onnx + seg_<k>_*.onnx
    m = load_segments("out/dit-seg")                                      # ONNX Runtime, host dispatch

Per input signature ``k``: ``init_<k>.onnx`` (every block computes and emits the state, as in the
``If`` layout) and, per block ``i``, ``seg_<k>_pre_<i>.onnx`` (glue + the statistic δ²),
``seg_<k>_compute_<i>.onnx`` and ``seg_<k>_predict_<i>.onnx``, then ``seg_<k>_post.onnx``. The
manifest (``"layout": "segments"``) records every segment's input and output names, the per-block
χ² bound and the state layout, so the runner (``fastcache_compile.segments.SegmentRunner`` over
ONNX Runtime sessions) needs no model code. This is the layout for TensorRT
(``export.tensorrt_segments``): no segment holds a conditional, so no ``If`` around an ``Attention``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fastcache_compile import calibration as _calibration
from fastcache_compile.backend import _outlined, resolve_form
from fastcache_compile.config import FastCacheConfig
from fastcache_compile.passes import insert_recording
from fastcache_compile.passes.insert_cache import BlockLayout
from fastcache_compile.passes.segments import BlockSpec, SegmentProgram, SegmentSpec, split_segments
from fastcache_compile.runtime import Variant
from fastcache_compile.segments import SegmentRunner

from . import _manifest
from ._capture import _classify, _output_info, _Rewritten, capture
from ._graph import export_graph, verify_graph
from .onnx import CALIBRATION_FILE, manifest_head
from .runner import ExportedModel, _providers, _Session

log = logging.getLogger(__name__)
LAYOUT = "segments"


class _Frozen(nn.Module):
    """One segment with the model's parameters as buffers (initializers) and constants baked in."""

    def __init__(self, gm: fx.GraphModule, inputs: Sequence[str], fixed: Mapping[str, Any]) -> None:
        super().__init__()
        self.graph_module = gm
        self.slots: list[tuple[str, Any]] = []
        for j, name in enumerate(inputs):
            value = fixed.get(name, _FREE)
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"p{j}", value.detach())
                self.slots.append(("param", f"p{j}"))
            else:
                self.slots.append(("free", None) if value is _FREE else ("const", value))

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rest = iter(flat)
        args = [getattr(self, v) if k == "param" else v if k == "const" else next(rest) for k, v in self.slots]
        return tuple(self.graph_module(*args))


_FREE = object()


def _examples(program: SegmentProgram, flat: list[Any]) -> dict[str, list[Any]]:
    """Each segment's inputs on one call: all blocks computed, then all blocks predicted."""
    seen: dict[str, list[Any]] = {}

    def record(gm: fx.GraphModule, args: list[Any]) -> fx.GraphModule:
        seen.setdefault(next(k for k, v in program.modules.items() if v is gm), list(args))
        return gm

    SegmentRunner(program, record)(*flat[:-1], torch.tensor(True))
    # +inf bound: every block takes the skip path, so each predictor sees real inputs once.
    skipping = dataclasses.replace(
        program, blocks=[dataclasses.replace(b, threshold=float("inf")) for b in program.blocks]
    )
    SegmentRunner(skipping, record)(*flat[:-1], torch.tensor(False))
    return seen


def _spec(s: SegmentSpec, file: str, used: Sequence[str]) -> dict[str, Any]:
    return {"name": s.name, "file": file, "inputs": [n for n in s.inputs if n in used], "outputs": list(s.outputs)}


def _export_variant(
    model: nn.Module,
    kwargs: Mapping[str, Any],
    directory: Path,
    k: int,
    config: FastCacheConfig,
    form: str,
    calib: _calibration.Calibration | None,
    say: Callable[[str], None],
    verify: bool,
) -> dict[str, Any]:
    tmpl, leaves = _manifest.template(kwargs)
    torch_kwargs = _manifest.rebuild(tmpl, {n: torch.as_tensor(v) for n, v in leaves.items()})
    _, leaves = _manifest.template(torch_kwargs)
    say(f"[{k}] capturing the Dynamo graph")
    gm, args, eager_out = capture(model, torch_kwargs)
    kinds, names = _classify(gm, args, leaves)
    outlined = _outlined(gm, args)
    fingerprint = _calibration.graph_fingerprint(outlined, args)
    if calib is not None:
        calib.check(outlined, args)
    program = split_segments(
        outlined, config.threshold, config.alpha, form, calib.block_params(form) if calib else None
    )
    n_out = program.meta["fastcache_num_outputs"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fixed = {n.name: v for n, v, kind in zip(placeholders, args, kinds) if kind != "input"}
    user = [a for a, kind in zip(args, kinds) if kind == "input"]
    user_names = [n for n in names if n is not None]
    graph_names = [n.name for n, kind in zip(placeholders, kinds) if kind == "input"]

    init_module = _Rewritten(insert_recording(_outlined(gm, args)), kinds, args).eval()
    with torch.no_grad():
        state = list(init_module(*user, torch.tensor(0.0))[n_out:-1])
    state_names = [s for b in program.blocks for s in b.state]
    outputs = [f"output_{i}" for i in range(n_out)] + [f"{s}_new" for s in state_names] + ["fc_computed"]
    init_file = f"init_{k}.onnx"
    say(f"[{k}] exporting {init_file}")
    init_args = (*user, torch.tensor(0.0))
    export_graph(init_module, init_args, [*user_names, "fc_step"], outputs, directory / init_file)
    if verify:
        verify_graph(init_module, init_args, directory / init_file, [*user_names, "fc_step"])

    with torch.no_grad():
        seen = _examples(program, [*args, *state, torch.tensor(1.0), torch.tensor(False)])
    specs: dict[str, dict[str, Any]] = {}
    for spec in program.segments():
        file = f"seg_{k}_{spec.name}.onnx"
        module = _Frozen(program.modules[spec.name], spec.inputs, fixed).eval()
        free = [n for n in spec.inputs if n not in fixed]
        ex = tuple(a for n, a in zip(spec.inputs, seen[spec.name]) if n not in fixed)
        if not all(isinstance(a, torch.Tensor) for a in ex):
            raise ValueError(f"segment {spec.name} takes a non-tensor value; it cannot be exported as ONNX")
        say(f"[{k}] exporting {file}")
        export_graph(module, ex, free, list(spec.outputs), directory / file)
        if verify:
            verify_graph(module, ex, directory / file, free)
        specs[spec.name] = _spec(spec, file, free)

    blocks = []
    for b in program.blocks:
        blocks.append(
            {
                "index": b.layout.index,
                "streams": list(b.layout.streams),
                "pairs": list(b.layout.pairs),
                "state": list(b.state),
                "stream_names": list(b.streams),
                "aliases": [list(a) for a in b.aliases],
                "chi2_threshold": b.threshold,
                **{kind: specs[getattr(b, kind).name] for kind in ("pre", "compute", "predict")},
            }
        )
    return {
        "init": init_file,
        "template": tmpl,
        "inputs": [
            {"name": n, "graph_name": g, "shape": list(a.shape), "dtype": _manifest.dtype_name(a.dtype)}
            for n, g, a in zip(user_names, graph_names, user)
        ],
        "num_outputs": n_out,
        "seq_output": bool(program.meta["fastcache_output_is_seq"]),
        "output": _output_info(eager_out, getattr(model, "_orig_mod", model), kwargs),
        "blocks": blocks,
        "post": specs.get("post"),
        "outputs": list(program.outputs),
        "fingerprint": fingerprint,
    }


def export_segments(
    model: nn.Module,
    example_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    verify: bool = True,
    **options: Any,
) -> Path:
    """Like ``export_onnx`` (same arguments and options), in the segment layout; returns the directory."""

    say = progress or log.info
    config = FastCacheConfig.from_options(options)
    if config.token_select or config.token_merge:
        raise ValueError("the segment layout covers block-level caching only; drop token_select / token_merge")
    if config.max_skips is not None:
        raise ValueError("max_skips is decided inside the cond graph, which export_segments lacks: use export_onnx")
    calib = _calibration.load(config.calibration) if config.calibration is not None else None
    form = resolve_form(config.approximation, calib)
    examples = [example_inputs] if isinstance(example_inputs, Mapping) else list(example_inputs)
    if not examples:
        raise ValueError("example_inputs must be the kwargs of one model call (or a non-empty list of them)")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)
    if model.training:
        raise ValueError("the model is in training mode (dropout would be exported): call model.eval() first")
    variants = [
        _export_variant(model, ex, directory, k, config, form, calib, say, verify) for k, ex in enumerate(examples)
    ]
    if calib is not None:
        shutil.copyfile(config.calibration, directory / CALIBRATION_FILE)
    manifest = {"layout": LAYOUT, **manifest_head(model, directory, variants, config, form, calib, variants[0]["init"])}
    manifest["variants"] = variants
    _manifest.write(directory, manifest)
    n_graphs = sum(1 + 3 * len(v["blocks"]) + (v["post"] is not None) for v in variants)
    say(f"wrote {n_graphs} ONNX graphs (no If) and {_manifest.MANIFEST} to {directory}")
    return directory


def program_from_manifest(variant: Mapping[str, Any]) -> SegmentProgram:
    """The segment program a manifest variant describes (no graphs: the runner gets sessions)."""

    def spec(d: Mapping[str, Any]) -> SegmentSpec:
        return SegmentSpec(d["name"], tuple(d["inputs"]), tuple(d["outputs"]))

    blocks = [
        BlockSpec(
            BlockLayout(b["index"], tuple(b["streams"]), tuple(b["pairs"])),
            spec(b["pre"]),
            spec(b["compute"]),
            spec(b["predict"]),
            tuple(b["stream_names"]),
            tuple(b["state"]),
            tuple((name, int(k)) for name, k in b["aliases"]),
            float(b["chi2_threshold"]),
        )
        for b in variant["blocks"]
    ]
    state = [s for b in blocks for s in b.state]
    inputs = (*[i["graph_name"] for i in variant["inputs"]], *state, "fc_step", "fc_force")
    post = spec(variant["post"]) if variant.get("post") else None
    meta = {
        "fastcache_layouts": [b.layout for b in blocks],
        "fastcache_num_outputs": variant["num_outputs"],
        "fastcache_output_is_seq": variant["seq_output"],
    }
    return SegmentProgram(inputs, blocks, post, tuple(variant["outputs"]), {}, meta)


class SegmentsModel(ExportedModel):
    """``ExportedModel`` whose cached variant is the host dispatcher over one ORT session per segment."""

    def _build(self, _gm: fx.GraphModule, args: Sequence[torch.Tensor]) -> Variant:
        shapes = [list(a.shape) for a in args]
        v = next((v for v in self.variants if [i["shape"] for i in v["inputs"]] == shapes), None)
        if v is None:
            known = [{i["name"]: i["shape"] for i in v["inputs"]} for v in self.variants]
            got = dict(zip(self._names, shapes))
            raise ValueError(f"no exported graph for input shapes {got}; exported for {known}. Re-export with them")
        program = program_from_manifest(v)
        opts = (self.providers, self.session_options)
        state = [s for b in program.blocks for s in b.state]
        outputs = [f"output_{i}" for i in range(v["num_outputs"])] + [f"{s}_new" for s in state] + ["fc_computed"]
        init = _Session(self.directory / v["init"], [*self._names, "fc_step"], outputs, *opts)
        specs = [b[kind] for b in v["blocks"] for kind in ("pre", "compute", "predict")]
        specs += [v["post"]] if v.get("post") else []
        sessions = {s["name"]: _Session(self.directory / s["file"], s["inputs"], s["outputs"], *opts) for s in specs}
        # Segments are called with their manifest inputs in order (parameters are initializers).
        runner = SegmentRunner(program, segments=sessions)
        return Variant(init, runner, v["num_outputs"], v["seq_output"], program.meta["fastcache_layouts"])


def load_segments(path: str | Path, provider: str = "CPUExecutionProvider", **overrides: Any) -> SegmentsModel:
    """Load a directory written by ``export_segments`` (``load_exported``'s arguments, less ``model``)."""
    directory, manifest = _manifest.read(path)
    if manifest.get("layout") != LAYOUT:
        raise ValueError(f"{directory} is not a segment-layout export: load it with load_exported")
    return SegmentsModel(directory, manifest, _providers(provider), None, **overrides)
