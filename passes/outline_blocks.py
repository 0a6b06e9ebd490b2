"""Outline each found block into a submodule call and label its hidden-state streams.

Before: a flat graph whose nodes carry ``meta["fastcache_block"]`` (from ``find_blocks``).
After: ``out = self.fastcache_block_<i>(a_0, ..., a_m)`` then ``getitem(out, k)`` per value the rest
of the graph reads. Each call node's ``meta["fastcache_streams"]`` lists the argument positions that
carry hidden states (the stream: values that flow block to block), and
``meta["fastcache_pairs"]`` gives, per output ``k``, the stream argument it is the residual update
of (or None). Conditioning shared by several blocks (timestep embeddings, text states, rotary
frequencies) and parameters are not streams.
"""

from __future__ import annotations

import operator
from collections import deque

import torch
from torch import fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from .find_blocks import BlockPlan

PREFIX = "fastcache_block_"
_RESIDUAL_OPS = {operator.add, operator.iadd, torch.add, operator.getitem, torch.cat}
_PASS_METHODS = {"add", "add_", "to", "contiguous", "clone", "float", "type_as"}


def _value(node: object) -> object:
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return None


def _is_state_input(node: fx.Node) -> bool:
    """Parameters and buffers: lifted module state (Dynamo names them ``L_self_...``) or attributes."""
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        return node.name.lower().startswith("l_self_") or isinstance(_value(node), torch.nn.Parameter)
    return False


def _residual_sources(sub: fx.GraphModule, output_index: int) -> list[int]:
    """Placeholders reachable from an output through residual adds / slicing (nearest first)."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in sub.graph.nodes if n.op == "output")
    start = out_node.args[0][output_index]
    seen, found, queue = set(), [], deque([start])
    while queue:
        node = queue.popleft()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            found.append(placeholders.index(node))
            continue
        passes = (node.op == "call_function" and node.target in _RESIDUAL_OPS) or (
            node.op == "call_method" and node.target in _PASS_METHODS
        )
        if passes:
            for arg in node.args:
                queue.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return found


def outline_blocks(gm: fx.GraphModule) -> fx.GraphModule:
    plan: BlockPlan = gm.meta["fastcache_plan"]
    partitions = [{node: None for node in block.nodes} for block in plan.blocks]
    gm = fuse_by_partitions(gm, partitions, prefix=PREFIX, always_return_tuple=True)
    gm.meta["fastcache_plan"] = plan

    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)]
    calls.sort(key=lambda n: int(str(n.target)[len(PREFIX) :]))
    uses: dict[fx.Node, int] = {}
    for call in calls:
        for arg in set(a for a in call.args if isinstance(a, fx.Node)):
            uses[arg] = uses.get(arg, 0) + 1
    for call in calls:
        sub: fx.GraphModule = getattr(gm, call.target)
        sub_placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        out_vals = [_value(a) for a in next(n for n in sub.graph.nodes if n.op == "output").args[0]]
        for user in call.users:  # getitem nodes made by the fuser carry no metadata yet
            if user.op == "call_function" and user.target is operator.getitem:
                user.meta.setdefault("example_value", out_vals[user.args[1]])
        streams = []
        for pos, arg in enumerate(call.args):
            val = _value(sub_placeholders[pos]) if _value(arg) is None else _value(arg)
            if (
                isinstance(arg, fx.Node)
                and not _is_state_input(arg)
                and uses.get(arg, 0) == 1
                and isinstance(val, torch.Tensor)
                and val.dim() >= 2
                and val.is_floating_point()
            ):
                streams.append(pos)
        pairs: list[int | None] = []
        taken: set[int] = set()
        for k, out in enumerate(out_vals):
            cands = [
                p
                for p in streams
                if p not in taken
                and isinstance(out, torch.Tensor)
                and tuple(_value(sub_placeholders[p]).shape) == tuple(out.shape)
            ]
            if len(cands) > 1:  # same shapes (e.g. as many text as image tokens): follow the residual path
                sources = [p for p in _residual_sources(sub, k) if p in cands]
                cands = sources[:1] or cands
            pairs.append(cands[0] if cands else None)
            if cands:
                taken.add(cands[0])
        call.meta["fastcache_streams"] = streams
        call.meta["fastcache_pairs"] = pairs
    gm.recompile()
    return gm
