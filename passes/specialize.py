"""Replace symbolic sizes by the concrete values of one call.

Before: a Dynamo graph with dynamic shapes takes ``SymInt`` placeholders (``s0``) and computes
sizes from them (``mul = s0 * 4``) that feed ``view``/``reshape`` inside blocks.
After: every size-valued node that depends only on sizes is replaced by its Python int for the
given inputs, so outlined blocks take tensors only (``torch.cond`` operands must be tensors) and
each compiled variant is static-shaped. Placeholders stay, so the call signature is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)
_SIZE_METHODS = {"size", "dim", "numel"}


def _is_symbolic(value: Any) -> bool:
    return isinstance(value, _SYM_TYPES)


def _computes_size(node: fx.Node) -> bool:
    """A symbolic size, a size method (``x.size(0)``) or ``x.shape``: what this pass may fold."""
    val = node.meta.get("example_value")
    if _is_symbolic(val) or (node.op == "call_method" and isinstance(val, (int, float, bool))):
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def specialize_symints(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, Any] = {}
    tensors: dict[fx.Node, torch.Tensor] = {}
    for node, value in zip(placeholders, args):
        if isinstance(value, torch.Tensor):
            tensors[node] = value
        elif isinstance(value, (int, float, bool)):
            env[node] = value
    if not env and not any(_is_symbolic(n.meta.get("example_value")) for n in gm.graph.nodes):
        return gm

    def lookup(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in env:
                return env[a]
            raise KeyError(a)
        return a

    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        if not _computes_size(node):
            continue
        try:
            if node.op == "call_method" and node.target in _SIZE_METHODS and node.args[0] in tensors:
                result = getattr(tensors[node.args[0]], node.target)(*map(lookup, node.args[1:]))
            elif node.op == "call_function" and node.target is getattr and node.args[0] in tensors:
                result = getattr(tensors[node.args[0]], node.args[1])
            elif node.op == "call_function":
                result = node.target(*map(lookup, node.args), **{k: lookup(v) for k, v in node.kwargs.items()})
            else:
                continue
        except (KeyError, TypeError):
            continue
        if isinstance(result, torch.Size):
            env[node] = tuple(result)
            continue
        if not isinstance(result, (int, float, bool)):
            continue
        env[node] = result
        node.replace_all_uses_with(result)  # type: ignore[arg-type]
        changed = True
    for node, value in env.items():
        if node.op == "placeholder":
            node.replace_all_uses_with(value)  # type: ignore[arg-type]
            changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm
