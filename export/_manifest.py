"""The ``manifest.json`` written next to the exported graphs, and the kwargs template it holds.

A model is called with keyword arguments, some of them tensors (the graph inputs), some plain values
(``return_dict=False``, ``added_cond_kwargs={"resolution": None}``) that Dynamo baked into the graph.
The manifest keeps the call's structure as a JSON *template*: tensors become ``{"$input": name}``,
plain values stay as they are. The runner binds a later call against it, so a call that differs in a
baked value fails loudly instead of silently running the graph traced for another value.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "fastcache-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INPUT_KEY = "$input"
# Output-format switch of diffusers models: it changes how outputs are wrapped, not the graph.
OUTPUT_SWITCH = "return_dict"

_PLAIN = (type(None), bool, int, float, str)


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def template(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON template of the call, {input name: tensor}); names are dotted key paths (``a.b.0``)."""
    leaves: dict[str, Any] = {}

    def walk(value: Any, path: str) -> Any:
        if _is_array(value):
            leaves[path] = value
            return {INPUT_KEY: path}
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, _PLAIN):
            return value
        raise ValueError(
            f"cannot export the model input {path!r} of type {type(value).__name__}: only tensors, numpy arrays, "
            "None, bool, int, float, str and dicts/lists of them can be recorded in the manifest"
        )

    return walk(dict(kwargs), ""), leaves


def bind(tmpl: dict[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """{input name: array} of a call; raises ValueError where it differs from the exported call."""
    leaves: dict[str, Any] = {}

    def walk(t: Any, value: Any, path: str) -> None:
        if isinstance(t, dict) and INPUT_KEY in t:
            if not _is_array(value):
                raise ValueError(f"input {path!r} must be a tensor or numpy array, got {type(value).__name__}")
            leaves[t[INPUT_KEY]] = value
        elif isinstance(t, dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"input {path!r} must be a dict like at export time, got {type(value).__name__}")
            extra = sorted(set(map(str, value)) - set(t))
            if extra:
                raise ValueError(f"unexpected input(s) {extra} under {path or 'the call'}; exported with {sorted(t)}")
            for key, sub in t.items():
                child = f"{path}.{key}" if path else key
                if key in value:
                    walk(sub, value[key], child)
                elif _contains_input(sub):
                    raise ValueError(f"missing input {child!r}: the model was exported with it")
        elif isinstance(t, list):
            if not isinstance(value, (list, tuple)) or len(value) != len(t):
                raise ValueError(f"input {path!r} must be a sequence of {len(t)} like at export time")
            for i, (sub, v) in enumerate(zip(t, value)):
                walk(sub, v, f"{path}.{i}")
        elif value != t:
            # Plain values were constants of the traced graph: another value would need another export.
            raise ValueError(f"input {path!r} is {value!r} but the model was exported with {t!r}; re-export for it")

    walk(tmpl, {k: v for k, v in kwargs.items() if k != OUTPUT_SWITCH}, "")
    return leaves


def rebuild(tmpl: Any, values: Mapping[str, Any]) -> Any:
    """The call's kwargs with every ``{"$input": name}`` replaced by ``values[name]``."""
    if isinstance(tmpl, dict) and INPUT_KEY in tmpl:
        return values[tmpl[INPUT_KEY]]
    if isinstance(tmpl, dict):
        return {k: rebuild(v, values) for k, v in tmpl.items()}
    if isinstance(tmpl, list):
        return [rebuild(v, values) for v in tmpl]
    return tmpl


def _contains_input(tmpl: Any) -> bool:
    if isinstance(tmpl, dict):
        return INPUT_KEY in tmpl or any(_contains_input(v) for v in tmpl.values())
    if isinstance(tmpl, list):
        return any(_contains_input(v) for v in tmpl)
    return False


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the manifest")
    return dtype


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(export directory, manifest); ValueError for anything but a complete export of this format version."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    file = directory / MANIFEST
    if not file.exists():
        raise ValueError(f"no {MANIFEST} in {directory}: export the model with fastcache_compile.export.export_onnx")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): it is truncated or damaged; {_REEXPORT}") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{file} holds a JSON {type(manifest).__name__}, not a manifest; {_REEXPORT}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} is format {manifest.get('format')!r} version {manifest.get('format_version')!r}, but this "
            f"fastcache_compile reads {FORMAT!r} version {FORMAT_VERSION}: re-export the model with this version"
        )
    _check_keys(file, manifest, _SCHEMA, "")
    if "layout" not in manifest:  # the If layout; other layouts (segments) name their graphs themselves
        _check_keys(file, manifest, {"variants": [{"cached": None}]}, "")
    _check_files(directory, manifest)
    return directory, manifest


_REEXPORT = "re-export the model with fastcache_compile.export.export_onnx"
# The keys every layout's runner reads; a list holds the schema of each of its items.
_SCHEMA: dict[str, Any] = {
    "config": {k: None for k in ("threshold", "alpha", "approximation", "warmup_steps", "num_steps", "max_streams")},
    "fingerprint": {"num_blocks": None, "widths": None, "param_hash": None},
    "variants": [
        {
            "init": None,
            "template": None,
            "num_outputs": None,
            "seq_output": None,
            "output": {"kind": None},
            "inputs": [{"name": None, "graph_name": None, "shape": None, "dtype": None}],
            "blocks": [{"index": None, "streams": None, "pairs": None, "state": None}],
        }
    ],
}


def _check_keys(file: Path, value: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{file}: {where or 'the manifest'} must be an object; {_REEXPORT}")
        missing = [k for k in schema if k not in value]
        if missing:
            at = f" in {where}" if where else ""
            raise ValueError(f"{file} is missing key(s) {missing}{at}: the export is incomplete or edited; {_REEXPORT}")
        for key, sub in schema.items():
            _check_keys(file, value[key], sub, f"{where}.{key}" if where else key)
    elif isinstance(schema, list):
        if not isinstance(value, list) or (where == "variants" and not value):
            raise ValueError(f"{file}: {where} must be a non-empty list; {_REEXPORT}")
        for i, item in enumerate(value):
            _check_keys(file, item, schema[0], f"{where}[{i}]")


def file_sizes(directory: Path, names: list[str]) -> dict[str, int]:
    """{file: bytes} of the exported files, so that load can tell a truncated or missing one."""
    return {name: (directory / name).stat().st_size for name in names}


def _check_files(directory: Path, manifest: dict[str, Any]) -> None:
    # Exports written before sizes were recorded: at least the graphs must be there.
    graphs = [v[k] for v in manifest["variants"] for k in ("init", "cached") if k in v]
    sizes = manifest.get("files") or dict.fromkeys(graphs)
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"the export in {directory} lacks {name} (listed in {MANIFEST}); {_REEXPORT}")
        if size is not None and path.stat().st_size != size:
            raise ValueError(
                f"{path} has {path.stat().st_size} bytes but was exported with {size}: it is truncated or was "
                f"replaced; copy the export again or {_REEXPORT}"
            )
