"""Export the rewritten model to ONNX: per input signature an ``init`` and a ``cached`` graph.

    model ─ Dynamo capture ─ _outlined ─┬─ insert_recording ─ torch.onnx.export ─ init_<k>.onnx
                                         └─ insert_cache ───── torch.onnx.export ─ cached_<k>.onnx   (one If per block)

Both graphs are the backend's own rewritten graphs (DESIGN.md, "Compiler design"): state is explicit,
so the cached graph takes ``(*user inputs, *state, fc_step, fc_force)`` and returns
``(*outputs, *new state, fc_computed)``, and each block's ``torch.cond`` becomes an ONNX ``If`` node.
Parameters are held as buffers of a wrapper module, so they become initializers. τ, α, the χ²
thresholds and any fitted maps are constants of the cached graph; the manifest records them with
the state layout, input roles and the model fingerprint for ``runner.load_exported``.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastcache_compile import __version__, rule
from fastcache_compile import calibration as _calibration
from fastcache_compile.backend import _outlined, resolve_form
from fastcache_compile.config import FastCacheConfig
from fastcache_compile.passes import insert_cache, insert_recording
from fastcache_compile.passes.insert_cache import CachedBlock, state_history

from . import _manifest
from ._capture import (
    Example,
    _classify,
    _examples,
    _external_files,
    _output_info,
    _Rewritten,
    capture,
    positional_names,
)
from ._graph import export_graph, verify_graph
from .runner import input_roles

log = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.safetensors"


def _export_variant(
    model: nn.Module,
    kwargs: Mapping[str, Any],
    directory: Path,
    k: int,
    config: FastCacheConfig,
    form: str,
    calib: _calibration.Calibration | None,
    say: Callable[[str], None],
    verify: bool,
) -> dict[str, Any]:
    tmpl, leaves = _manifest.template(kwargs)
    torch_kwargs = _manifest.rebuild(tmpl, {n: torch.as_tensor(v) for n, v in leaves.items()})
    _, leaves = _manifest.template(torch_kwargs)  # the tensors Dynamo will see, for identity matching
    say(f"[{k}] capturing the Dynamo graph")
    gm, args, eager_out = capture(model, torch_kwargs)
    kinds, names = _classify(gm, args, leaves)
    outlined = _outlined(gm, args)
    fingerprint = _calibration.graph_fingerprint(outlined, args)
    if calib is not None:
        calib.check(outlined, args)
    params = calib.block_params(form) if calib else None
    cached = insert_cache(outlined, config.threshold, config.alpha, form, params, max_skips=config.max_skips)
    # the forecaster keeps K residuals per output: the init graph must emit the same state layout
    history = state_history(form, params)
    init = insert_recording(_outlined(gm, args), history=history)
    layouts = cached.meta["fastcache_layouts"]
    n_out = cached.meta["fastcache_num_outputs"]

    user = [a for a, kind in zip(args, kinds) if kind == "input"]
    user_names = [n for n in names if n is not None]
    state_names = [n.name for n in cached.graph.nodes if n.op == "placeholder" and n.name.startswith("fc_")][:-2]
    outputs = [f"output_{i}" for i in range(n_out)] + [f"{s}_new" for s in state_names] + ["fc_computed"]
    init_module, cached_module = _Rewritten(init, kinds, args).eval(), _Rewritten(cached, kinds, args).eval()
    with torch.no_grad():
        state = list(init_module(*user, torch.tensor(0.0))[n_out:-1])
        # fill the history (forced computes) so that the check below reaches the skip side of every If:
        # the forecast form computes until its oldest stored step is real
        for step in range(1, history):
            state = list(cached_module(*user, *state, torch.tensor(float(step)), torch.tensor(True))[n_out:-1])
    init_file, cached_file = f"init_{k}.onnx", f"cached_{k}.onnx"
    say(f"[{k}] exporting {init_file}")
    init_args, init_inputs = (*user, torch.tensor(0.0)), [*user_names, "fc_step"]
    export_graph(init_module, init_args, init_inputs, outputs, directory / init_file)
    say(f"[{k}] exporting {cached_file} ({len(layouts)} blocks as ONNX If)")
    cached_args = (*user, *state, torch.tensor(float(history)), torch.tensor(False))
    cached_inputs = [*user_names, *state_names, "fc_step", "fc_force"]
    export_graph(cached_module, cached_args, cached_inputs, outputs, directory / cached_file)
    if verify:
        say(f"[{k}] checking both graphs under ONNX Runtime")
        verify_graph(init_module, init_args, directory / init_file, init_inputs)
        for force in (True, False):  # both sides of every If
            forced = (*cached_args[:-1], torch.tensor(force))
            verify_graph(cached_module, forced, directory / cached_file, cached_inputs)

    blocks, cursor = [], 0
    by_index = {m.layout.index: m for m in cached.children() if isinstance(m, CachedBlock)}
    modules = [by_index[lay.index] for lay in layouts]
    for lay, module in zip(layouts, modules):
        dof = sum(state[cursor + j].numel() for j in range(len(lay.streams)))  # x̂ has the stream shapes
        cutoff = getattr(module, "_cutoff", None)  # the forecaster's conformal cutoff on ê, when fitted
        blocks.append(
            {
                "index": lay.index,
                "streams": list(lay.streams),
                "pairs": list(lay.pairs),
                "history": lay.history,
                "state": state_names[cursor : cursor + lay.num_state],
                "dof": dof,
                "rule": "chi2" if cutoff is None else "conformal",
                "chi2_threshold": rule.skip_threshold(config.threshold, config.alpha, dof),
                # null without a cutoff, or where none passes (the block never skips): strict JSON has no inf
                "conformal_cutoff": None if cutoff is None or not math.isfinite(cutoff) else float(cutoff),
            }
        )
        cursor += lay.num_state
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    graph_names = [n.name for n, kind in zip(placeholders, kinds) if kind == "input"]
    return {
        "init": init_file,
        "cached": cached_file,
        "template": tmpl,
        "inputs": [
            {"name": n, "graph_name": g, "shape": list(a.shape), "dtype": _manifest.dtype_name(a.dtype)}
            for n, g, a in zip(user_names, graph_names, user)
        ],
        "num_outputs": n_out,
        "seq_output": bool(cached.meta["fastcache_output_is_seq"]),
        "output": _output_info(eager_out, getattr(model, "_orig_mod", model), kwargs),
        "blocks": blocks,
        "fingerprint": fingerprint,
    }


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    # diffusers models carry a config dict pipelines read (in_channels, sample_size); keep its JSON part.
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        return None
    return {k: v for k, v in config.items() if _json_safe(v)}


def _json_safe(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_json_safe(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_safe(v) for k, v in value.items())
    return isinstance(value, (type(None), bool, int, float, str))


def export_onnx(
    model: nn.Module,
    example_inputs: Example | list[Example],
    path: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    verify: bool = True,
    **options: Any,
) -> Path:
    """Export the FastCache-rewritten ``model`` to ONNX files plus ``manifest.json`` in directory ``path``.

    ``example_inputs`` are the inputs of one model call: a tuple of positional arguments, e.g.
    ``(x, t, y)`` as for ``torch.export``, or a dict of keyword arguments; or a list of such calls, one
    graph pair per input signature (e.g. batch 1 and the CFG batch 2). ``options`` are those of the backend
    (``FastCacheConfig``: threshold, alpha, warmup_steps, num_steps, calibration, approximation,
    max_streams); ``lowering`` is ignored. Graphs are static-shaped, like the backend's variants.
    ``verify`` runs every graph once under ONNX Runtime (when installed) against the torch graph.
    Returns the directory; load it with ``fastcache_compile.export.load_exported``.
    """

    say = progress or log.info
    config = FastCacheConfig.from_options(options)
    if config.token_select or config.token_merge:
        raise ValueError(
            "export covers block-level caching only; drop token_select / token_merge from the export options "
            "(they stay available under torch.compile)"
        )
    calib = _calibration.load(config.calibration) if config.calibration is not None else None
    form = resolve_form(config.approximation, calib)
    model = getattr(model, "_orig_mod", model)
    examples = _examples(model, example_inputs)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    if model.training:
        raise ValueError("the model is in training mode (dropout would be exported): call model.eval() first")
    variants = [
        _export_variant(model, ex, directory, k, config, form, calib, say, verify) for k, ex in enumerate(examples)
    ]
    files = [f for v in variants for g in (v["init"], v["cached"]) for f in (g, *_external_files(directory / g))]
    if calib is not None:
        shutil.copyfile(config.calibration, directory / CALIBRATION_FILE)  # the maps are graph constants too
        files.append(CALIBRATION_FILE)
    manifest = manifest_head(model, directory, variants, config, form, calib, variants[0]["cached"])
    manifest["positional"] = positional_names(model)  # lets the runner take positional arguments too
    manifest["files"] = _manifest.file_sizes(directory, files)
    manifest["variants"] = variants
    _manifest.write(directory, manifest)
    say(f"wrote {len(variants) * 2} ONNX graphs and {_manifest.MANIFEST} to {directory}")
    return directory


def manifest_head(
    model: nn.Module,
    directory: Path,
    variants: list[dict[str, Any]],
    config: FastCacheConfig,
    form: str,
    calib: Any,
    opset_graph: str,
) -> dict[str, Any]:
    """The manifest keys every layout shares. Also gives each variant's inputs their roles and checks that
    all variants trace one block structure (their fingerprints are popped: the manifest holds one)."""
    import onnx

    for v in variants:
        for spec, role in zip(v["inputs"], input_roles(v["inputs"])):
            spec["role"] = role  # timestep / conditioning (selects the state slot) / latent
    fingerprint = variants[0].pop("fingerprint")
    for v in variants[1:]:
        if v.pop("fingerprint") != fingerprint:
            raise ValueError("the example inputs trace different block structures; export them separately")
    return {
        "format": _manifest.FORMAT,
        "format_version": _manifest.FORMAT_VERSION,
        "fastcache_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "opset": onnx.load(str(directory / opset_graph), load_external_data=False).opset_import[0].version,
        "config": {
            "threshold": config.threshold,
            "alpha": config.alpha,
            "approximation": form,
            "warmup_steps": config.warmup_steps,
            "num_steps": config.num_steps,
            "max_streams": config.max_streams,
            "refresh_every": config.refresh_every,
            "refresh_steps": None if config.refresh_steps is None else list(config.refresh_steps),
            "max_skips": config.max_skips,
        },
        "calibration": None
        if calib is None
        else {"file": CALIBRATION_FILE, "recommended": calib.recommended, "metrics": calib.metrics},
        "fingerprint": fingerprint,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": _model_config(model),
    }
