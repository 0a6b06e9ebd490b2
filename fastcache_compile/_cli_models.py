"""What ``--model`` names on the command line, loaded without any repository-relative path.

* ``reference``: the reference MMDiT shipped inside the package (``fastcache_compile/reference/mmdit-fmnist``).
* a folder in the reference format: ``from_pretrained`` files of an ``SD3Transformer2DModel`` (config.json,
  diffusion_pytorch_model.safetensors) plus ``label_encoder.safetensors`` (prompt tables ``tokens``
  (11, T, J) and ``pooled`` (11, P), row 10 the empty prompt), ``sampling.json`` (steps, guidance) and
  ``scheduler/`` (a ``FlowMatchEulerDiscreteScheduler``). Every command takes it.
* ``module:factory``: ``factory()`` from a module importable from the current directory. It returns a
  ``fastcache_compile.reference.Reference`` (every command) or ``(model, example_kwargs)`` (export only).

A plain diffusers model folder (config.json without the reference files) is refused: fastcache cannot
know how to sample it or what one call's inputs are. Wrap it in a factory instead.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from .reference import DEFAULT_PATH, NULL_ROW, Reference
from .reference import load as load_reference

Loaded = Reference | tuple[torch.nn.Module, Any]
T = TypeVar("T")
_MODEL_HELP = (
    "--model must be 'reference', a reference-format model folder (config.json + label_encoder.safetensors + "
    "sampling.json + scheduler/), or 'module:factory' importable from the current directory"
)


def load_model(spec: str) -> Loaded:
    """Resolve a ``--model`` value; a spec that names nothing exits with the accepted forms."""
    if spec == "reference":
        if not (DEFAULT_PATH / "config.json").exists():
            raise ValueError(
                "the reference model is not part of this installation (reference/mmdit-fmnist is missing "
                "from the package); reinstall fastcache-compile or pass --model FOLDER"
            )
        return load_reference(DEFAULT_PATH)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(path)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name or os.sep in module:
        raise SystemExit(f"fastcache: error: {_MODEL_HELP}; got {spec!r} (no such folder either)")
    return _factory(module, name)


def _folder(path: Path) -> Reference:
    if (path / "label_encoder.safetensors").exists():
        try:
            return load_reference(path)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
    config = path / "config.json"
    if config.exists():
        cls = json.loads(config.read_text()).get("_class_name", "an unknown model class")
        raise ValueError(
            f"{path} is a plain diffusers model folder ({cls}) without the reference-format files "
            "(label_encoder.safetensors, sampling.json, scheduler/): fastcache cannot know its sampler or the "
            "inputs of one call. Write a factory `def make(): return model, example_kwargs` (export) or one "
            "that returns a fastcache_compile.reference.Reference (all commands) and pass --model module:make"
        )
    raise ValueError(f"{path} is a folder without config.json; {_MODEL_HELP}")


def _factory(module: str, name: str) -> Loaded:
    # Users run the command next to their own code; the console script's sys.path does not hold cwd.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load {module}:{name} from {cwd}: {err}") from None
    made = factory()
    if isinstance(made, Reference):
        return made
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
        raise ValueError(
            f"{module}:{name}() must return (model, example_kwargs) or a fastcache_compile.reference.Reference, "
            f"got {type(made).__name__}"
        )
    return made


def require_reference(loaded: Loaded, command: str) -> Reference:
    """The loaded model as a ``Reference``: ``command`` samples it, so bare example inputs are not enough."""
    if isinstance(loaded, Reference):
        return loaded
    raise ValueError(
        f"`fastcache {command}` samples images, so it needs a model with its sampler: 'reference', a "
        "reference-format folder, or a factory returning a fastcache_compile.reference.Reference; a factory "
        "returning (model, example_kwargs) is for `fastcache export` only"
    )


def reference_inputs(ref: Reference, batch: int) -> dict[str, Any]:
    """One call of a reference model: half class prompts, half empty prompts for an even (CFG) batch."""
    cfg = ref.transformer.config
    rows = torch.arange(batch) % NULL_ROW
    if batch % 2 == 0:
        rows[batch // 2 :] = NULL_ROW
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
        "encoder_hidden_states": ref.tokens[rows],
        "pooled_projections": ref.pooled[rows],
        "timestep": torch.full((batch,), 1000.0),
        "return_dict": False,
    }


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``(fn(), wall seconds, process CPU seconds)``; CPU time sums all threads, so it exceeds wall when parallel."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def psnr(images: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2) against ``target``; inf when identical."""
    mse = float(((images.float() - target.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)
