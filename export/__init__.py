"""Offline export of the FastCache-rewritten model for deployment without the Python model code.

    export_onnx(model, example_kwargs, "out/dit", threshold=0.1)     # init/cached ONNX graphs + manifest.json
    m = load_exported("out/dit")                                     # ONNX Runtime, same call signature
    export_tensorrt("out/dit", "out/dit-trt")                         # serialized TensorRT engines (untested here)

onnx / onnxruntime / tensorrt are optional dependencies, imported when these functions are called.
"""

from .onnx import export_onnx
from .runner import ExportedModel, load_exported
from .segments_onnx import export_segments, load_segments
from .tensorrt import export_tensorrt
from .tensorrt_segments import build_segment_engines

__all__ = [
    "ExportedModel",
    "build_segment_engines",
    "export_onnx",
    "export_segments",
    "export_tensorrt",
    "load_exported",
    "load_segments",
]
