"""Build serialized TensorRT engines from a directory written by ``export_onnx``.

UNTESTED HERE: this project's machines have no NVIDIA GPU and no ``tensorrt`` package, so this code
only follows the documented TensorRT Python API (``Builder``, ``NetworkDefinition`` with
``EXPLICIT_BATCH``, ``OnnxParser``, ``BuilderConfig``, ``build_serialized_network``). Each block's
ONNX ``If`` maps to a TensorRT conditional (``IIfConditionalLayer``), which the ONNX parser builds
when both branches return the same shapes, as the exported branches do.

The engines sit beside copies of the ONNX graphs (``init_<k>.engine``, ``cached_<k>.engine``) and the
manifest gains an ``engines`` entry per variant. The stateful caching logic stays in
``runner.load_exported``; to run through TensorRT from Python without your own engine runner, load
the ONNX directory with ``provider="TensorrtExecutionProvider"`` instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _manifest

log = logging.getLogger(__name__)


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ImportError(
            "building TensorRT engines needs the TensorRT Python package and an NVIDIA GPU: pip install tensorrt "
            "(or use load_exported(..., provider='TensorrtExecutionProvider') with onnxruntime-gpu)"
        ) from err
    return trt


def build_engine(onnx_path: Path, *, fp16: bool = False, workspace_bytes: int = 4 << 30) -> bytes:
    """One serialized engine for one static-shaped ONNX graph."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # EXPLICIT_BATCH is the only mode in TensorRT >= 10 (and the flag is deprecated there).
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files relative to the model, unlike parse(bytes).
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    return bytes(engine)


def export_tensorrt(
    onnx_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    fp16: bool = False,
    workspace_bytes: int = 4 << 30,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build ``.engine`` files for every graph of an ONNX export; returns ``out_dir``.

    Untested here (no NVIDIA GPU / TensorRT available). Raises ImportError if tensorrt is missing.
    Engines are specific to the GPU and TensorRT version they were built with.
    """
    _import_tensorrt()
    say = progress or log.info
    src, manifest = _manifest.read(onnx_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for variant in manifest["variants"]:
        engines = {}
        for kind in ("init", "cached"):
            name = Path(variant[kind]).with_suffix(".engine").name
            say(f"building TensorRT engine {name}")
            (out / name).write_bytes(build_engine(src / variant[kind], fp16=fp16, workspace_bytes=workspace_bytes))
            engines[kind] = name
        variant["engines"] = engines
    if out.resolve() != src.resolve():
        # ONNX graphs (and their external weights) and calibration travel along: the directory stays
        # loadable by load_exported, e.g. with provider="TensorrtExecutionProvider".
        for f in src.iterdir():
            if f.is_file() and f.name != _manifest.MANIFEST:
                shutil.copyfile(f, out / f.name)
    trt = _import_tensorrt()
    manifest["tensorrt"] = {"version": trt.__version__, "fp16": fp16}
    (out / _manifest.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out
