"""Reading and writing a calibration file, checked at the door.

A calibration file is safetensors: the fitted tensors plus string metadata (format version,
fingerprint, recommended form, metrics, and the shape of every tensor it was written with). A file
that is not that, or whose tensors do not fit together, is refused here with the file's name, what
is wrong and how to fix it, rather than failing deep inside a compiled graph later on. Whether the
file belongs to the model at hand is a separate check (``Calibration.check``), made once the graph
is known.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = "1"
_FIX = "re-run fastcache_compile.calibrate(model, run, path) to write a new one"


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"calibration file {path!r} {what}; {_FIX}")


def write(
    path: str | os.PathLike[str],
    fingerprint: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    recommended: str,
    metrics: dict[str, Any],
) -> None:
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": json.dumps(fingerprint),
        "recommended": recommended,
        "metrics": json.dumps(metrics),
        # lets load tell a tensor that is missing or reshaped from one the writer never had
        "tensor_shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()}),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=meta)


def read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor], str, dict[str, Any]]:
    """``(fingerprint, tensors, recommended, metrics)`` of a calibration file; ValueError if unusable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"calibration file {path!r} does not exist; create it with fastcache_compile.calibrate")
    if os.path.isdir(path):
        raise _bad(path, "is a directory, not a file: pass the .safetensors file that calibrate wrote")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise _bad(path, f"cannot be read as safetensors ({err}): it is truncated, corrupt or another format") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} is not a fastcache calibration file of format {FORMAT_VERSION} (its metadata has "
            f"format_version={meta.get('format_version')!r}); {_FIX}"
        )
    try:
        fingerprint = json.loads(meta["fingerprint"])
        metrics = json.loads(meta.get("metrics", "{}"))
        shapes = json.loads(meta["tensor_shapes"]) if "tensor_shapes" in meta else None
    except (KeyError, json.JSONDecodeError) as err:
        raise _bad(path, f"has damaged metadata ({type(err).__name__}: {err})") from err
    recommended = meta.get("recommended", "reuse")
    _check_fingerprint(path, fingerprint)
    _check_tensors(path, fingerprint, tensors, shapes)
    return fingerprint, tensors, recommended, metrics


def _check_fingerprint(path: str, fp: Any) -> None:
    n = fp.get("num_blocks") if isinstance(fp, dict) else None
    widths = fp.get("widths") if isinstance(fp, dict) else None
    ok = (
        isinstance(n, int)
        and n >= 1
        and isinstance(widths, list)
        and len(widths) == n
        and all(isinstance(w, list) and all(isinstance(d, int) and d >= 1 for d in w) for w in widths)
    )
    if not ok:
        raise _bad(path, f"has a damaged fingerprint (num_blocks {n!r}, widths {widths!r})")


def _check_tensors(
    path: str, fp: dict[str, Any], tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]] | None
) -> None:
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise _bad(path, f"has {bad} NaN/Inf value(s) in tensor {name!r} (the calibration runs diverged?)")
    if shapes is not None:
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise _bad(path, f"is missing tensor(s) {missing} that it was written with")
        for name, value in tensors.items():
            if name in shapes and list(value.shape) != shapes[name]:
                raise _bad(path, f"has tensor {name!r} of shape {list(value.shape)}, written as {shapes[name]}")
    _check_structure(path, fp, tensors, set(shapes or ()))


def _check_structure(path: str, fp: dict[str, Any], tensors: dict[str, torch.Tensor], written: set[str]) -> None:
    """The fitted maps against each other and the fingerprint: one β per block, ``a``/``w``/``b``
    for the same block outputs, each ``D × D`` (``b``: ``D``) with ``D`` a width of that block.

    Tensors of other kinds are accepted when the metadata lists them (written by a later form)."""
    n, widths = fp["num_blocks"], fp["widths"]
    outputs: dict[str, set[tuple[int, int]]] = {"a": set(), "w": set(), "b": set()}
    for name, value in tensors.items():
        kind, *idx = name.split(".")
        shape = tuple(value.shape)
        if name == "stack.w":
            if len(shape) != 2 or shape[0] != shape[1] or shape[0] not in widths[0]:
                raise _bad(path, f"has {name!r} of shape {list(shape)}; expected D x D with D in {widths[0]}")
            continue
        numeric = all(i.isdigit() for i in idx)
        if kind == "beta" and len(idx) == 1 and numeric and int(idx[0]) < n:
            if shape != ():
                raise _bad(path, f"has {name!r} of shape {list(shape)}; a β is one number (shape [])")
            continue
        if kind in outputs and len(idx) == 2 and numeric and int(idx[0]) < n:
            i = int(idx[0])
            want_rank = 1 if kind == "b" else 2
            square = want_rank == 1 or shape[0] == shape[-1]
            if len(shape) != want_rank or not square or shape[0] not in widths[i]:
                form = "D" if kind == "b" else "D x D"
                raise _bad(path, f"has {name!r} of shape {list(shape)}; expected {form} with D in {widths[i]}")
            outputs[kind].add((i, int(idx[1])))
            continue
        if name not in written:
            raise _bad(path, f"has an unexpected tensor {name!r} (for a model of {n} blocks)")
    missing = [f"beta.{i}" for i in range(n) if f"beta.{i}" not in tensors]
    every = outputs["a"] | outputs["w"] | outputs["b"]
    missing += [f"{kind}.{i}.{k}" for kind, have in outputs.items() for i, k in sorted(every - have)]
    if missing:
        raise _bad(path, f"is missing tensor(s) {missing}")
    for i, k in sorted(every):
        rows = {kind: tensors[f"{kind}.{i}.{k}"].shape[0] for kind in outputs}
        if len(set(rows.values())) != 1:
            raise _bad(path, f"has maps of different widths for block {i} output {k}: {rows}")
    _check_forecaster(path, tensors, n)


def _check_forecaster(path: str, tensors: dict[str, torch.Tensor], n: int) -> None:
    """Per block with forecaster tensors, the full set that the skip paths read, of consistent shapes.

    A block without its error-model coefficients would skip on a constant prediction in eager and fail
    in-graph; drift pairs come as a pair of equal length or not at all."""
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        kind, _, idx = name.partition(".")
        if kind in ("fc_table", "fc_coef", "fc_pred", "fc_err", "fc_dpred", "fc_derr") and idx.isdigit():
            if int(idx) >= n:
                raise _bad(path, f"has {name!r} for a model of {n} blocks")
            blocks.setdefault(int(idx), {})[kind] = value
    for i, have in sorted(blocks.items()):
        missing = [f"{k}.{i}" for k in ("fc_table", "fc_coef", "fc_pred", "fc_err") if k not in have]
        for a, b in (("fc_dpred", "fc_derr"), ("fc_derr", "fc_dpred")):
            if a in have and b not in have:
                missing.append(f"{b}.{i}")
        if missing:
            raise _bad(path, f"is missing forecaster tensor(s) {missing}")
        table, coef = have["fc_table"], have["fc_coef"]
        order = table.shape[1] if table.dim() == 2 else 0
        gap = round(table.shape[0] ** (1.0 / order)) if order else 0
        if not order or gap**order != table.shape[0]:
            raise _bad(path, f"has 'fc_table.{i}' of shape {list(table.shape)}; expected (max_gap**K, K)")
        if tuple(coef.shape) != (4,):
            raise _bad(path, f"has 'fc_coef.{i}' of shape {list(coef.shape)}; expected [4]")
        for a, b in (("fc_pred", "fc_err"), ("fc_dpred", "fc_derr")):
            if a in have and (have[a].dim() != 1 or have[a].shape != have[b].shape):
                raise _bad(
                    path,
                    f"has '{a}.{i}' / '{b}.{i}' of shapes {list(have[a].shape)} / {list(have[b].shape)}; "
                    "expected two 1-D tensors of one length",
                )
