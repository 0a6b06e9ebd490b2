"""Run an exported model with ONNX Runtime and the backend's caching behaviour.

    model = load_exported("out/dit")                    # directory written by export_onnx
    sample = model(hidden_states=x, timestep=t, class_labels=y, return_dict=False)[0]
    model.stats(); model.reset()

The caching logic is not re-implemented: ``ExportedModel`` drives the backend's own
``fastcache_compile.runtime.CacheRuntime`` (per conditioning-stream slots, new generation when the
timestep jumps up, warm-up / last-step forcing, state carried between calls, statistics) with
variants whose ``init`` and ``cached`` graphs are ONNX Runtime sessions instead of compiled FX graphs.
The model code is not needed; torch is, for tensors at the interface (numpy in gives numpy out).

Outputs: a tensor model returns a tensor; with ``return_dict=False`` a tuple; otherwise an object with
the model's output fields (``.sample`` for diffusers transformers): the model's own output class when
it can be imported, else an ``ExportedOutput``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fastcache_compile.config import FastCacheConfig
from fastcache_compile.passes.insert_cache import BlockLayout
from fastcache_compile.runtime import CacheRuntime, Variant

from . import _manifest

# Options the runner may change: they steer the runtime, not the graphs (τ, α and maps are baked in).
RUNTIME_OPTIONS = ("warmup_steps", "num_steps", "max_streams", "refresh_every", "refresh_steps")
_GPU_FALLBACKS = {"TensorrtExecutionProvider": ("CUDAExecutionProvider",)}


class AttrDict(dict):
    """A dict with attribute access, like diffusers' ``FrozenDict`` configs and ``BaseOutput``s."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


class ExportedOutput(AttrDict):
    """Stand-in for a model output class that cannot be imported here (``.sample`` etc.)."""


class _Session:
    """One ONNX graph as a callable on torch tensors, in the argument order CacheRuntime uses."""

    def __init__(self, path: Path, names: list[str], outputs: list[str], providers: list[str], options: Any) -> None:
        import onnxruntime as ort

        if options is None:
            options = ort.SessionOptions()
            options.log_severity_level = 3  # the exporter leaves unused initializers ORT warns about
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.names = names
        # The exporter drops graph inputs nothing reads (e.g. s′ under plain reuse): feed only the rest.
        self.used = {i.name for i in self.session.get_inputs()}
        self.outputs = outputs

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        feed = {n: a.detach().cpu().numpy() for n, a in zip(self.names, args) if n in self.used}
        return [torch.from_numpy(o) for o in self.session.run(self.outputs, feed)]


def _placeholder_graph(inputs: Sequence[Mapping[str, Any]]) -> fx.GraphModule:
    # CacheRuntime reads input roles (timestep, latent, conditioning) from Dynamo's placeholder names;
    # a graph of just those placeholders lets it classify the exported inputs exactly as it did live.
    graph = fx.Graph()
    for spec in inputs:
        graph.placeholder(spec["graph_name"])
    graph.output(None)
    return fx.GraphModule(nn.Module(), graph)


def _inference_only(_args: Any = None) -> Any:
    raise ValueError("an exported FastCache model is inference-only: pass inputs that do not require grad")


def _runtime(inputs: Sequence[Mapping[str, Any]], config: FastCacheConfig, build: Any) -> CacheRuntime:
    examples = [torch.empty(0) for _ in inputs]
    return CacheRuntime(_placeholder_graph(inputs), examples, config, build, _inference_only)


def input_roles(inputs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per input "timestep", "conditioning" (identifies a stream slot) or "latent", as the runtime sees them."""
    rt = _runtime(inputs, FastCacheConfig(), None)
    roles = ["conditioning" if i in rt._cond_pos else "latent" for i in range(len(inputs))]
    if rt._timestep_pos is not None:
        roles[rt._timestep_pos] = "timestep"
    return roles


def _import(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


class ExportedModel:
    """A stateful callable with the model's call signature, backed by ONNX Runtime sessions."""

    def __init__(
        self, directory: Path, manifest: dict[str, Any], providers: list[str], session_options: Any, **overrides: Any
    ) -> None:
        check_overrides(overrides)  # both loaders land here: the graphs fix every other option
        self.directory, self.manifest = directory, manifest
        self.providers, self.session_options = providers, session_options
        # ``config`` is the model's own (pipelines read ``transformer.config.in_channels``); the cache's
        # options live in ``cache_config``.
        self.config = AttrDict(manifest.get("model_config") or {})
        cfg = manifest["config"]
        self.cache_config = FastCacheConfig(
            threshold=cfg["threshold"],
            alpha=cfg["alpha"],
            warmup_steps=cfg["warmup_steps"],
            num_steps=cfg["num_steps"],
            max_streams=cfg["max_streams"],
            approximation=cfg["approximation"],
            refresh_every=cfg.get("refresh_every"),  # absent from exports made before the option existed
            refresh_steps=cfg.get("refresh_steps"),
            lowering="eager",
        ).replace(**overrides)
        self.variants = manifest["variants"]
        first = self.variants[0]
        if any([i["name"] for i in v["inputs"]] != [i["name"] for i in first["inputs"]] for v in self.variants):
            raise ValueError("all exported signatures must take the same inputs")
        self._template = first["template"]
        self._names = [i["name"] for i in first["inputs"]]
        self._dtypes = [_manifest.torch_dtype(i["dtype"]) for i in first["inputs"]]
        # numpy or torch, and which device, the outputs follow: the latent input's.
        self._latent = next((i["name"] for i in first["inputs"] if i.get("role") == "latent"), self._names[0])
        self._runtime = _runtime(first["inputs"], self.cache_config, self._build)

    def _build(self, _gm: fx.GraphModule, args: Sequence[torch.Tensor]) -> Variant:
        shapes = [list(a.shape) for a in args]
        for v in self.variants:
            if [i["shape"] for i in v["inputs"]] == shapes:
                break
        else:
            known = [{i["name"]: i["shape"] for i in v["inputs"]} for v in self.variants]
            got = dict(zip(self._names, shapes))
            raise ValueError(f"no exported graph for input shapes {got}; exported for {known}. Re-export with them")
        state = [s for b in v["blocks"] for s in b["state"]]
        outputs = [f"output_{i}" for i in range(v["num_outputs"])] + [f"{s}_new" for s in state] + ["fc_computed"]
        opts = (self.providers, self.session_options)
        init = _Session(self.directory / v["init"], [*self._names, "fc_step"], outputs, *opts)
        cached_inputs = [*self._names, *state, "fc_step", "fc_force"]
        cached = _Session(self.directory / v["cached"], cached_inputs, outputs, *opts)
        layouts = [
            BlockLayout(b["index"], tuple(b["streams"]), tuple(b["pairs"]), b.get("history", 2)) for b in v["blocks"]
        ]
        return Variant(init, cached, v["num_outputs"], v["seq_output"], layouts, self.manifest["fingerprint"])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = self._by_name(args, kwargs)
        leaves = _manifest.bind(self._template, kwargs)
        first = leaves[self._latent]
        args = [torch.as_tensor(leaves[n]).to(dtype=d) for n, d in zip(self._names, self._dtypes)]
        outs = self._runtime(*args)
        outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
        if isinstance(first, np.ndarray):
            outs = [o.numpy() for o in outs]
        elif first.device != outs[0].device:
            outs = [o.to(first.device) for o in outs]
        return self._wrap(outs, kwargs.get(_manifest.OUTPUT_SWITCH, True))

    def _by_name(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        names = self.manifest.get("positional") or []
        if len(args) > len(names):
            raise ValueError(
                f"got {len(args)} positional arguments, but the exported model takes at most {len(names)} by position "
                f"({names}); pass inputs by keyword"
            )
        twice = sorted(set(names[: len(args)]) & set(kwargs))
        if twice:
            raise ValueError(f"input(s) {twice} given both by position and by keyword")
        return {**dict(zip(names, args)), **kwargs}

    def _wrap(self, outs: list[Any], return_dict: bool) -> Any:
        info = self.variants[0]["output"]
        if info["kind"] == "tensor":
            return outs[0]
        fields = info.get("fields") or []
        if not return_dict or not fields:
            return tuple(outs)
        values = dict(zip(fields, outs))
        cls = _import(info["class"]) if "class" in info else None
        return cls(**values) if cls is not None else ExportedOutput(values)

    def reset(self) -> None:
        """Forget all cache state and statistics; the next call starts a new generation."""
        self._runtime.reset()

    def stats(self) -> dict[str, Any]:
        """What the cache did, with the keys of ``fastcache_compile.stats``."""
        s = self._runtime.summary()
        blocks = s["blocks_computed"] + s["blocks_skipped"]
        return {"graphs": 1, **s, "skip_ratio": s["blocks_skipped"] / blocks if blocks else 0.0}


def _providers(provider: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(
            f"ONNX Runtime provider {provider!r} is not available here (available: {available}); "
            "install the matching onnxruntime build (e.g. onnxruntime-gpu for CUDA / TensorRT)"
        )
    chain = [provider, *[p for p in _GPU_FALLBACKS.get(provider, ()) if p in available]]
    return chain + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])


def _check_model(model: nn.Module, manifest: dict[str, Any]) -> None:
    from fastcache_compile.backend import _outlined
    from fastcache_compile.calibration import graph_fingerprint

    from ._capture import capture

    first = manifest["variants"][0]
    # Any values of the exported shapes do: the fingerprint reads block structure and parameters only.
    values = {i["name"]: torch.ones(i["shape"], dtype=_manifest.torch_dtype(i["dtype"])) for i in first["inputs"]}
    gm, args, _ = capture(model, _manifest.rebuild(first["template"], values))
    mine = graph_fingerprint(_outlined(gm, args), args)
    theirs = manifest["fingerprint"]
    for key in ("num_blocks", "widths", "param_hash"):
        if mine[key] != theirs.get(key):
            raise ValueError(
                f"the exported model does not match this model: {key} is {theirs.get(key)!r} in the manifest but "
                f"{mine[key]!r} here. Re-export it with fastcache_compile.export.export_onnx"
            )


def check_overrides(overrides: dict[str, Any]) -> None:
    """``ValueError`` for load-time options that are not runtime options (the graphs fix the others)."""
    bad = sorted(set(overrides) - set(RUNTIME_OPTIONS))
    if bad:
        raise ValueError(
            f"cannot override {bad} at load time: only {list(RUNTIME_OPTIONS)} are runtime options; "
            "threshold, alpha and the approximation are constants of the exported graphs (re-export to change them)"
        )


def load_exported(
    path: str | os.PathLike[str],
    provider: str = "CPUExecutionProvider",
    *,
    model: nn.Module | None = None,
    session_options: Any = None,
    **overrides: Any,
) -> ExportedModel:
    """Load a directory written by ``export_onnx`` as a stateful callable running on ONNX Runtime.

    ``provider``: an ONNX Runtime execution provider; "TensorrtExecutionProvider" is passed on to ORT
    (with CUDA and CPU as fallbacks) but is untested here: no NVIDIA GPU or TensorRT was available.
    ``model``: if given, its fingerprint must match the exported one (ValueError otherwise).
    ``overrides``: runtime options ``warmup_steps``, ``num_steps``, ``max_streams``, ``refresh_every``,
    ``refresh_steps``.
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ImportError("load_exported needs onnxruntime: pip install 'fastcache-compile[onnx]'") from err
    directory, manifest = _manifest.read(path)
    if model is not None:
        _check_model(model, manifest)
    if manifest.get("layout") == "segments":
        # one graph per static segment, decided on the host (export_segments)
        from .segments_onnx import SegmentsModel

        return SegmentsModel(directory, manifest, _providers(provider), session_options, **overrides)
    return ExportedModel(directory, manifest, _providers(provider), session_options, **overrides)
