"""One rewritten graph through ``torch.onnx.export`` (dynamo exporter), checked and run once.

Two ops need a translation of their own: the stride hint ``insert_cache`` adds while tracing (ONNX has
no strides: an identity) and ``squeeze`` of a dimension that is not 1 (a no-op in torch that onnxscript
0.7 turns into an invalid ONNX ``Squeeze``). Everything else, ``torch.cond`` → ``If`` included, is the
stock exporter.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _force_stride_order(x: Any, stride: Sequence[int]) -> Any:
    # ONNX tensors have no strides: the layout hint insert_cache adds while tracing is an identity.
    from onnxscript import opset18 as op

    return op.Identity(x)


def _squeeze_dims(x: Any, dims: Sequence[int]) -> Any:
    # torch's squeeze of a dimension whose size is not 1 is a no-op; ONNX Squeeze rejects it
    # (onnxscript 0.7 emits it anyway: PixArt's ``hidden_states.squeeze(1)`` on (B, N, C)).
    from onnxscript import opset18 as op

    shape = x.shape
    if shape is not None:
        dims = [d for d in dims if len(shape) and not (isinstance(shape[d], int) and shape[d] != 1)]
    if not dims:
        return op.Identity(x)
    return op.Squeeze(x, op.Constant(value_ints=list(dims)))


def _squeeze_dim(x: Any, dim: int) -> Any:
    return _squeeze_dims(x, [dim])


def _translations() -> dict[Callable, Callable]:
    return {
        torch.ops.prims.inductor_force_stride_order.default: _force_stride_order,
        torch.ops.aten.squeeze.dim: _squeeze_dim,
        torch.ops.aten.squeeze.dims: _squeeze_dims,
    }


def export_graph(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    with torch.no_grad():
        module(*args)  # fills Python-side caches (the χ² thresholds come from scipy) outside of Dynamo
    with warnings.catch_warnings():
        # torch's own exporter internals trip a deprecation of its pytree API; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        # Strict (Dynamo) export: it lifts the tensors a cond branch reads by closure (the fitted maps of
        # the skip branch) into branch operands. Non-strict export (torch.onnx's default) leaves them as
        # fake constants inside the branch, and decomposition then fails with "Attempting to use
        # FunctionalTensor on its own" (torch 2.13).
        exported = torch.export.export(module, args, strict=True)
        program = torch.onnx.export(
            exported,
            args,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            custom_translation_table=_translations(),
            verbose=False,
        )
    program.save(path)
    import onnx

    # Path-based (works past the 2 GB protobuf limit); full_check adds strict shape inference, which
    # catches ops ONNX Runtime would refuse to load.
    onnx.checker.check_model(str(path), full_check=True)


def verify_graph(module: nn.Module, args: tuple, path: Path, names: list[str]) -> None:
    """The ONNX graph under ONNX Runtime gives the rewritten torch graph's outputs on the example."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: %s was not run after export", path.name)
        return
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    used = {i.name for i in session.get_inputs()}
    got = session.run(None, {n: a.numpy() for n, a in zip(names, args) if n in used})
    with torch.no_grad():
        want = module(*args)
    for name, g, w in zip([o.name for o in session.get_outputs()], got, want):
        g = torch.from_numpy(g)
        tol = 1e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-3  # kernels differ, not the maths
        if g.shape != w.shape or not torch.allclose(g.to(w.dtype), w, rtol=tol, atol=tol * 0.1):
            err = (g.to(w.dtype) - w).abs().max() if g.shape == w.shape else f"shape {tuple(g.shape)}"
            raise RuntimeError(f"{path.name}: output {name!r} differs from the torch graph ({err}); please report")
