"""FastCache for Diffusion Transformers as a ``torch.compile`` backend.

model = torch.compile(model, backend="fastcache", options={"threshold": 0.05})
fastcache_compile.stats(model); fastcache_compile.reset(model)
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import fastcache_backend
from .calibration import Calibration, calibrate
from .config import FastCacheConfig
from .runtime import runtimes_for

__all__ = [
    "Calibration",
    "FastCacheConfig",
    "calibrate",
    "export_onnx",
    "export_tensorrt",
    "fastcache_backend",
    "load_exported",
    "reset",
    "stats",
]
__version__ = "0.1.0"


def _register() -> None:
    # The entry point makes the name known without this import; registering here as well keeps
    # ``backend="fastcache"`` working from a source checkout that was never pip-installed.
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "fastcache" not in _BACKENDS:
        register_backend(name="fastcache")(fastcache_backend)


_register()


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """What the cache did for ``model`` (the object ``torch.compile`` returned, or the original)."""
    runtimes = runtimes_for(model)
    if not runtimes:
        raise ValueError(
            "no fastcache state for this model: compile it with torch.compile(model, backend='fastcache') "
            "and call it at least once"
        )
    total: dict[str, Any] = {"graphs": len(runtimes)}
    for rt in runtimes:
        s = rt.summary()
        for key in ("calls", "generations", "blocks_computed", "blocks_skipped", "compiled_variants"):
            total[key] = total.get(key, 0) + s[key]
        prev = total.get("per_block_skipped", [])
        cur = s["per_block_skipped"]
        total["per_block_skipped"] = [a + b for a, b in zip(prev, cur)] if prev else list(cur)
        total["_work"] = total.get("_work", 0.0) + s["work_fraction"] * s["calls"]
        if "tokens_per_call" in s:  # token selection: tokens run through the blocks per call
            total.setdefault("tokens_per_call", []).extend(s["tokens_per_call"])
            total["num_tokens"] = s["num_tokens"]
            total["_tokens"] = total.get("_tokens", 0.0) + s["token_fraction"] * len(s["tokens_per_call"])
    if "tokens_per_call" in total:  # the runtimes' per-call means, weighted by their calls
        total["token_fraction"] = total.pop("_tokens") / len(total["tokens_per_call"])
    # Share of the block stack's token-blocks that ran: block skips and token selection together.
    total["work_fraction"] = total.pop("_work") / total["calls"] if total["calls"] else 1.0
    blocks = total["blocks_computed"] + total["blocks_skipped"]
    total["skip_ratio"] = total["blocks_skipped"] / blocks if blocks else 0.0
    return total


def reset(model: torch.nn.Module) -> None:
    """Forget all cache state and statistics of ``model``; the next call starts a new generation."""
    for rt in runtimes_for(model):
        rt.reset()


def export_onnx(model: torch.nn.Module, example_inputs: Any, path: str, **options: Any) -> Any:
    """Export the cache-rewritten ``model`` to ONNX + ``manifest.json`` (needs the ``onnx`` extra)."""
    from .export import export_onnx as _export

    return _export(model, example_inputs, path, **options)


def load_exported(path: str, provider: str = "CPUExecutionProvider", **kwargs: Any) -> Any:
    """A stateful ONNX Runtime callable with the model's signature and the backend's caching behaviour."""
    from .export import load_exported as _load

    return _load(path, provider, **kwargs)


def export_tensorrt(onnx_dir: str, out_dir: str, **kwargs: Any) -> Any:
    """Build TensorRT engines from an ONNX export (needs ``tensorrt``; untested without an NVIDIA GPU)."""
    from .export import export_tensorrt as _build

    return _build(onnx_dir, out_dir, **kwargs)
