"""What the exporters take from the model: its Dynamo graph, its example calls, its inputs' roles.

``capture`` traces one call the way the backend sees it; ``_Rewritten`` holds a rewritten graph with
the model's parameters as buffers (they become initializers) and only user inputs as arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fastcache_compile.runtime import _is_module_state

from . import _manifest

# One model call: positional arguments (what torch.export takes) or keyword arguments.
Example = tuple[Any, ...] | Mapping[str, Any] | torch.Tensor


def positional_names(model: nn.Module) -> list[str]:
    """Names of ``model.forward``'s parameters that can be passed by position, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]


def _as_kwargs(model: nn.Module, example: Any, where: str) -> dict[str, Any]:
    """One example call as keyword arguments: the manifest, the runner and Dynamo's input names use them."""
    if isinstance(example, Mapping):
        return dict(example)
    if isinstance(example, torch.Tensor):
        example = (example,)
    if not isinstance(example, tuple):
        raise ValueError(
            f"{where} must be a tuple of positional arguments, e.g. (x, t, y), or a dict of keyword arguments "
            f"of one model call; got {type(example).__name__}"
        )
    names = positional_names(model)
    if len(example) > len(names):
        raise ValueError(
            f"{where} has {len(example)} positional arguments but {type(model).__name__}.forward takes at most "
            f"{len(names)} by position ({names}); pass the rest in a dict of keyword arguments"
        )
    return dict(zip(names, example))


def _examples(model: nn.Module, example_inputs: Any) -> list[dict[str, Any]]:
    if not isinstance(example_inputs, list):
        return [_as_kwargs(model, example_inputs, "example_inputs")]
    if not example_inputs:
        raise ValueError("example_inputs is an empty list: give one call (a tuple or dict), or a list of them")
    if any(isinstance(e, torch.Tensor) for e in example_inputs):
        # A list means several signatures; a list of tensors is almost surely one call's arguments.
        raise ValueError(
            "example_inputs is a list of tensors; a list means one call per input signature. Pass the "
            "positional arguments of one call as a tuple, e.g. (x, t, y), or a list of such tuples"
        )
    return [_as_kwargs(model, e, f"example_inputs[{k}]") for k, e in enumerate(example_inputs)]


def _external_files(path: Path) -> list[str]:
    """The external-data files an ONNX graph refers to (large models keep weights outside the protobuf)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            names |= {e.value for e in tensor.external_data if e.key == "location"}
    return sorted(names)


def capture(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[fx.GraphModule, list[Any], Any]:
    """(Dynamo graph, its example inputs, the eager output) of one call, as the backend would see it."""
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    def grab(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    base = getattr(model, "_orig_mod", model)
    with torch.no_grad():
        # dynamic=False: if this model's forward was compiled before at other shapes, Dynamo's automatic
        # dynamic shapes would trace symbolic sizes here, which the static ONNX graphs cannot hold.
        out = torch.compile(base, backend=grab, fullgraph=True, dynamic=False)(**kwargs)
    if len(graphs) != 1:
        raise ValueError(f"expected one Dynamo graph for the model call, got {len(graphs)}")
    return graphs[0][0], graphs[0][1], out


class _Rewritten(nn.Module):
    """A rewritten graph with the model's parameters as buffers and only user inputs as arguments."""

    def __init__(self, gm: fx.GraphModule, kinds: list[str], example_inputs: list[Any]) -> None:
        super().__init__()
        self.graph_module = gm
        self.kinds = kinds  # per Dynamo placeholder: "param", "input" or "const"
        self.consts = {i: v for i, (k, v) in enumerate(zip(kinds, example_inputs)) if k == "const"}
        for i, (kind, value) in enumerate(zip(kinds, example_inputs)):
            if kind == "param":
                self.register_buffer(f"p{i}", value.detach())

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args: list[Any] = []
        rest = iter(flat)
        for i, kind in enumerate(self.kinds):
            if kind == "param":
                args.append(getattr(self, f"p{i}"))
            else:
                args.append(self.consts[i] if kind == "const" else next(rest))
        return tuple(self.graph_module(*args, *rest))


def _classify(gm: fx.GraphModule, args: list[Any], leaves: dict[str, Any]) -> tuple[list[str], list[str | None]]:
    """Per placeholder its kind and, for user inputs, the kwargs path it is fed from."""
    by_id = {id(v): name for name, v in leaves.items()}
    if len(by_id) != len(leaves):
        # Dynamo feeds one tensor passed twice through one placeholder; the runner could not tell them apart.
        raise ValueError("the example inputs pass the same tensor object twice: give every input its own tensor")
    kinds, names = [], []
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], args):
        if isinstance(value, torch.Tensor) and _is_module_state(node, value):
            kinds.append("param")
            names.append(None)
        elif isinstance(value, torch.Tensor):
            if id(value) not in by_id:
                raise ValueError(f"graph input {node.name!r} is not one of the call's tensors; cannot name it")
            kinds.append("input")
            names.append(by_id[id(value)])
        else:  # a Python number Dynamo lifted; specialize_symints baked its value into the graph
            kinds.append("const")
            names.append(None)
    return kinds, names


def _output_info(out: Any, base: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(out, torch.Tensor):
        return {"kind": "tensor"}
    if isinstance(out, (tuple, list)):
        info: dict[str, Any] = {"kind": "tuple"}
        if type(base).__module__.startswith("diffusers") and kwargs.get(_manifest.OUTPUT_SWITCH) is False:
            info["fields"] = ["sample"]  # what diffusers returns with return_dict=True
        return info
    fields = list(out.keys()) if isinstance(out, Mapping) else []
    return {"kind": "object", "class": f"{type(out).__module__}.{type(out).__qualname__}", "fields": fields}
