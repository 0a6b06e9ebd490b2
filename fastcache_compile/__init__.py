"""FastCache for Diffusion Transformers as a ``torch.compile`` backend.

model = torch.compile(model, backend="fastcache", options={"threshold": 0.05})
fastcache_compile.stats(model); fastcache_compile.reset(model)   # per model instance and compile
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import fastcache_backend
from .calibration import Calibration, calibrate
from .config import FastCacheConfig
from .context_parallel import prepare_context_parallel
from .diffusers_hooks import cache_hooks, refusal
from .instances import summarize
from .runtime import owners_of_model

__all__ = [
    "Calibration",
    "FastCacheConfig",
    "calibrate",
    "export_onnx",
    "export_tensorrt",
    "fastcache_backend",
    "load_exported",
    "prepare_context_parallel",
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


def _compiled_config(model: Any) -> FastCacheConfig | None:
    """The options of a ``torch.compile(..., backend="fastcache")`` result; None for anything else
    (the original module, or a custom backend callable whose options cannot be read)."""
    backend = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    while hasattr(backend, "_torchdynamo_orig_backend"):  # Dynamo's wrappers around the backend
        backend = backend._torchdynamo_orig_backend
    if getattr(backend, "compiler_fn", None) is not fastcache_backend:
        return None
    return FastCacheConfig.from_options(getattr(backend, "kwargs", {}).get("options"))


def _owners(model: torch.nn.Module) -> list[Any]:
    owners = owners_of_model(model)
    config = _compiled_config(model)
    return owners if config is None else [o for o in owners if o.config == config]


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """What the cache did for this model instance under this compile.

    ``model`` is the object ``torch.compile`` returned, or the original module if it was compiled
    with fastcache once (compiled twice with different options, pass the compiled object).
    """
    found = cache_hooks(getattr(model, "_orig_mod", model))
    if found:
        raise refusal(found)  # fastcache stood aside: any numbers would be stale
    owners = _owners(model)
    if not owners:
        raise ValueError(
            "no fastcache state for this model: compile it with torch.compile(model, backend='fastcache') "
            "and call it at least once"
        )
    configs = {o.config for o in owners}
    if len(configs) > 1:
        raise ValueError(
            f"this module was compiled with fastcache {len(configs)} times with different options; pass the "
            "object torch.compile returned to say which compile's statistics you want"
        )
    # one owner per calling thread: the compile's statistics are their sum
    return summarize([pair for o in owners for pair in o.parts.items()], sum(o.schedule.generations for o in owners))


def reset(model: torch.nn.Module) -> None:
    """Forget the cache state and statistics of this model instance (every compile of it when given
    the original module); its next call starts a new generation. Other instances keep theirs."""
    for owner in _owners(model):
        owner.reset()


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
