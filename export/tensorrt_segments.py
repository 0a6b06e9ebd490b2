"""TensorRT for the segment form: one engine per static segment, the decision on the host.

Two paths, both strongly typed (the precision is the dtype of the exported graph: export a bf16 /
fp16 model rather than setting builder flags, which TensorRT 11 removed):

* ``build_segment_engines(onnx_dir, out_dir)``: a directory from ``export_segments`` → one
  ``.engine`` per ONNX graph (``init`` and every segment) with the TensorRT Python API
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, ``OnnxParser``, ``build_serialized_network``),
  manifest updated. No segment holds an ``If``, so none hits TensorRT 10.16's failure with an
  ``Attention`` node inside a conditional.
* ``tensorrt_lowering``: the ``lower`` callable of ``SegmentRunner`` for ``lowering="tensorrt"``:
  each segment through torch-tensorrt's dynamo converter, with ``require_full_compilation`` and
  ``pass_through_build_failures`` so an unconvertible segment raises instead of silently running in
  PyTorch.

Neither path has run on this project's machines (no NVIDIA GPU, no tensorrt); a missing package is a
clear ImportError, never a fallback. ``benchmarks/gpu_check.py`` exercises both where a GPU exists.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from . import _manifest
from .tensorrt import _import_tensorrt

log = logging.getLogger(__name__)


def _import_torch_tensorrt() -> Any:
    try:
        import torch_tensorrt
    except ImportError as err:
        raise ImportError(
            "lowering='tensorrt' needs torch-tensorrt built for this torch version and an NVIDIA GPU: "
            f"pip install torch-tensorrt=={'.'.join(torch.__version__.split('.')[:2])}.*"
        ) from err
    mine, theirs = torch.__version__.split(".")[:2], str(torch_tensorrt.__version__).split(".")[:2]
    if mine != theirs:
        raise ImportError(
            f"torch-tensorrt {torch_tensorrt.__version__} does not match torch {torch.__version__}: "
            f"install torch-tensorrt=={'.'.join(mine)}.*"
        )
    return torch_tensorrt


def build_engine(onnx_path: Path, *, workspace_bytes: int = 4 << 30) -> bytes:
    """One serialized engine of a static-shaped ONNX graph, strongly typed (TensorRT 10 and 11)."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is None:
        raise ImportError(f"TensorRT {trt.__version__} has no strongly typed networks: install tensorrt>=10")
    # Explicit batch is the only mode from TensorRT 10 on; STRONGLY_TYPED takes every layer's precision
    # from the graph's tensor types, so no precision flag is set on the builder config.
    network = builder.create_network(1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external weights next to the model
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    return bytes(engine)


def build_segment_engines(
    onnx_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workspace_bytes: int = 4 << 30,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """``.engine`` files for every graph of a segment-layout export; returns ``out_dir``.

    The manifest gains ``"engine"`` beside each ``"file"`` (and ``"init_engine"`` per variant) and a
    ``"tensorrt"`` entry; the ONNX graphs are copied along so the directory stays loadable by
    ``load_segments``. Engines are specific to the GPU and TensorRT version that built them.
    """
    trt = _import_tensorrt()
    say = progress or log.info
    src, manifest = _manifest.read(onnx_dir)
    if manifest.get("layout") != "segments":
        raise ValueError(f"{src} is not a segment-layout export: write it with export_segments")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for variant in manifest["variants"]:
        specs = [b[kind] for b in variant["blocks"] for kind in ("pre", "compute", "predict")]
        specs += [variant["post"]] if variant.get("post") else []
        entries = [(variant, "init", "init_engine"), *[(s, "file", "engine") for s in specs]]
        for holder, key, engine_key in entries:
            name = Path(holder[key]).with_suffix(".engine").name
            say(f"building TensorRT engine {name}")
            (out / name).write_bytes(build_engine(src / holder[key], workspace_bytes=workspace_bytes))
            holder[engine_key] = name
            count += 1
    if out.resolve() != src.resolve():
        for f in src.iterdir():
            if f.is_file() and f.name != _manifest.MANIFEST:
                shutil.copyfile(f, out / f.name)
    manifest["tensorrt"] = {"version": trt.__version__, "strongly_typed": True, "engines": count}
    (out / _manifest.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def tensorrt_lowering(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """``SegmentRunner``'s ``lower`` for ``lowering="tensorrt"``: one torch-tensorrt engine per segment."""
    torch_tensorrt = _import_torch_tensorrt()
    if not any(isinstance(a, torch.Tensor) and a.is_cuda for a in example_inputs):
        raise ValueError("lowering='tensorrt' needs the model and its inputs on a CUDA device")
    device = next(a.device for a in example_inputs if isinstance(a, torch.Tensor) and a.is_cuda)

    def on_device(args: Sequence[Any]) -> tuple[Any, ...]:
        # The runtime keeps the step counter and the state's steps as 0-dim CPU tensors; an engine
        # takes device tensors only.
        return tuple(a.to(device) if isinstance(a, torch.Tensor) and not a.is_cuda else a for a in args)

    examples = on_device(example_inputs)
    exported = torch.export.export(gm, examples, strict=False)
    compile_fn = torch_tensorrt.dynamo.compile
    params = inspect.signature(compile_fn).parameters
    options: dict[str, Any] = {
        "min_block_size": 1,
        "require_full_compilation": True,  # a segment TensorRT cannot take is an error, not PyTorch ops
        "pass_through_build_failures": True,
    }
    if "use_explicit_typing" in params:
        options["use_explicit_typing"] = True  # precision from the graph's dtypes (strong typing)
    options = {k: v for k, v in options.items() if k in params}
    inputs_key = "arg_inputs" if "arg_inputs" in params else "inputs"
    trt_module = compile_fn(exported, **{inputs_key: list(examples)}, **options)

    def run(*args: Any) -> Any:
        return trt_module(*on_device(args))

    return run
