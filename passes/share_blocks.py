"""Compile each distinct block once: identical blocks of one stack share one ``invoke_subgraph`` body.

Inductor lowers, schedules and generates code for every node of the graph it is given, so a stack of
L identical blocks costs L times one block, and token selection multiplies that again by its
re-specialised stacks (one per bucket). The blocks of a DiT differ only in their weights, which the
outlined block graphs take as inputs, so one graph serves all of them. Before Inductor lowering,
``share_repeated_blocks`` finds the block graphs that are structurally equal (same ops, same
arguments, same input shapes, strides and dtypes) within one stack and replaces them by one
``SharedBlock`` that, while traced, calls ``torch.ops.higher_order.invoke_subgraph`` with one
identifier per group: AOTAutograd traces the body once and Inductor lowers it once per graph.

The module tree is changed in place; run eagerly, a ``SharedBlock`` calls its graph directly.
Measured in ``benchmarks/compile_time.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from .block_state import _BlockBase, _tracing
from .outline_blocks import PREFIX

log = logging.getLogger(__name__)


class SharedBlock(nn.Module):
    """One block's call into a graph that other, identical blocks call too."""

    def __init__(self, graph: fx.GraphModule, identifier: str) -> None:
        super().__init__()
        self.graph_module = graph
        self.identifier = identifier

    def forward(self, *args: Any) -> Any:
        # invoke_subgraph takes tensor operands only; a block with a Python constant argument
        # (never seen in Dynamo's block graphs, which lift them) runs its graph inline.
        if _tracing(args) and all(isinstance(a, torch.Tensor) for a in args):
            return torch.ops.higher_order.invoke_subgraph(self.graph_module, self.identifier, *args)
        return self.graph_module(*args)


def _target(node: fx.Node) -> Any:
    # call_function targets are compared as objects (two different functions may print alike)
    return node.target if node.op in ("call_function", "call_method") else None


def signature(block: fx.GraphModule) -> tuple | None:
    """A key equal for two block graphs exactly when one can run as the other; None if the graph
    reads attributes or submodules (their values differ between blocks and are not inputs)."""
    index: dict[fx.Node, int] = {}
    key: list[tuple] = []
    for i, node in enumerate(block.graph.nodes):
        if node.op in ("get_attr", "call_module"):
            return None
        index[node] = i
        meta = None
        if node.op == "placeholder":
            val = node.meta.get("val", node.meta.get("example_value"))
            if not isinstance(val, torch.Tensor):
                return None
            meta = (tuple(val.shape), val.stride(), val.dtype, val.device.type)
        args = repr(map_arg((node.args, node.kwargs), lambda a: f"%{index[a]}"))
        key.append((node.op, _target(node), args, meta))
    return tuple(key)


def _block_slots(gm: fx.GraphModule) -> list[tuple[str, nn.Module, str, fx.GraphModule]]:
    """(stack scope, owner, attribute, block graph) for every outlined block in the module tree."""
    slots = []
    for name, owner in gm.named_modules():
        for attr, child in owner.named_children():
            if not isinstance(child, fx.GraphModule):
                continue
            if attr.startswith(PREFIX):  # a plain outlined block of a stack graph
                slots.append((name, owner, attr, child))
            elif attr == "block" and isinstance(owner, _BlockBase):  # inside a cached / recording block
                slots.append((name.rpartition(".")[0], owner, attr, child))
    return slots


def _region_options() -> Any:
    """invoke_subgraph bodies nested in ``cond`` branches do not inherit Inductor's decompositions
    (torch 2.13 then fails with "both a fallback and a decomp for same op"); name them explicitly."""
    from torch._higher_order_ops.invoke_subgraph import NestedCompileRegionOptions
    from torch._inductor.decomposition import select_decomp_table

    return NestedCompileRegionOptions(decompositions=select_decomp_table())


Slot = tuple[nn.Module, str, fx.GraphModule]  # (owner, attribute, the block graph it held)


def share_repeated_blocks(gm: fx.GraphModule) -> list[Slot]:
    """Let identical blocks of each stack share one body; returns the slots changed (for ``unshare``)."""
    groups: dict[tuple, list[Slot]] = {}
    for scope, owner, attr, block in _block_slots(gm):
        # Blocks are grouped within a stack only: stacks re-specialised to other token counts keep
        # the original graphs' shape metadata, and identifiers must not mix shapes.
        key = signature(block)
        if key is not None:
            groups.setdefault((scope, key), []).append((owner, attr, block))
    repeated = [members for members in groups.values() if len(members) > 1]
    if not repeated:
        return []
    try:
        options = _region_options()
    except ImportError as err:  # an older torch without nested compile regions: compile as before
        log.info("fastcache: blocks are compiled one by one (%s)", err)
        return []
    changed: list[Slot] = []
    for g, members in enumerate(repeated):
        body = members[0][2]
        body.meta["nested_region_config"] = options
        for owner, attr, block in members:
            setattr(owner, attr, SharedBlock(body, f"fastcache_block_body_{g}"))
            changed.append((owner, attr, block))
    return changed


def unshare(changed: list[Slot]) -> None:
    """Give every changed slot its own block graph back (``share_repeated_blocks`` undone)."""
    for owner, attr, block in changed:
        setattr(owner, attr, block)
