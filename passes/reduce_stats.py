"""Skip statistics reduced across the ranks of a context-parallel group.

Under sequence (context) parallelism every rank holds a shard of the tokens. If each rank tested
only its own shard, ranks would reach different skip decisions, one would enter a block's
all-to-all and the other not, and the job would deadlock. So each block's statistic is made global
before the branch: the local sums ``(Σ‖x − x̂‖², Σ‖x̂‖²)`` of the sharded streams are all-reduced
(SUM) over the group, the replicated streams' sums are added once, and the ratio is taken after
that. Sums (not averages of ratios) keep uneven shards exact, and the χ² degrees of freedom are the
global element count. Every rank then takes the same branch by construction.

This is an analysis on the outlined graph (nothing is rewritten): ``block_reducers(gm)`` returns one
reducer per block call. Where the graph holds no collective, each reducer is the identity
(``rule.relative_change`` and the local element count), so single-process graphs are unchanged.

What the graph shows (diffusers' context-parallel hooks, traced by Dynamo)::

    chunk = x.chunk(W, dim=1); x_r = chunk[r]                 # the CP plan's input split, r = rank
    ... _c10d_functional.all_to_all_single(q, ..., group_name) ...   # Ulysses attention in a block
    ... _c10d_functional.all_gather_into_tensor(y, W, group_name) ... # output gather

A value is *sharded* if it derives from such a split (a ``chunk``/``tensor_split`` into W pieces of
which only this rank's piece is used) and no all-gather replicated it again; everything else is
replicated on every rank.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import fx

from fastcache_compile import rule

from .outline_blocks import PREFIX, _value

_COLLECTIVE_NS = "_c10d_functional"
_GATHERS = ("all_gather_into_tensor", "all_gather_into_tensor_coalesced")
_SPLITS = ("chunk", "tensor_split")


class ParallelPlanError(ValueError):
    """The graph holds collectives, but which block streams are sharded cannot be told from it."""


@dataclass(frozen=True)
class LocalStats:
    """The identity reducer: the block's own tokens are all the tokens (no process group)."""

    def relative_change(self, xs: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
        return rule.relative_change(xs, refs)

    def dof(self, xs: list[torch.Tensor]) -> int:
        return sum(x.numel() for x in xs)


@dataclass(frozen=True)
class GroupStats:
    """δ² and the χ² degrees of freedom of one block over all ranks of ``group``."""

    group: str  # process-group name, as the graph's collectives carry it
    sharded: tuple[bool, ...]  # per block stream: split across the ranks (else replicated)
    global_dof: int  # element count of the block's streams over the whole group

    def relative_change(self, xs: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
        from torch.distributed import _functional_collectives as fc

        local = [
            torch.stack([rule.squared_change(x, r), rule.squared_norm(r)]) for x, r in zip(xs, refs)
        ]  # per stream: (2,) local (num, den)
        zero = torch.zeros(2, device=xs[0].device)
        shard = sum((s for s, on in zip(local, self.sharded) if on), zero)
        # One all-reduce per block; functional, so it traces into the graph like the CP hooks' own.
        total = fc.wait_tensor(fc.all_reduce(shard, "sum", self.group)) + sum(
            (s for s, on in zip(local, self.sharded) if not on), zero
        )  # a replicated stream counts once: every rank holds all of it
        return total[0] / total[1]

    def dof(self, xs: list[torch.Tensor]) -> int:
        return self.global_dof


Reducer = LocalStats | GroupStats
LOCAL = LocalStats()


def collective_group(gm: fx.GraphModule) -> str | None:
    """Name of the process group the graph's collectives run over (submodules included), or None."""
    names = set()
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op == "call_function" and _COLLECTIVE_NS in str(node.target):
                names.update(a for a in node.args if isinstance(a, str))
    if len(names) > 1:
        raise ParallelPlanError(
            f"collectives over several process groups {sorted(names)} in one graph; fastcache reduces its "
            "statistic over one context-parallel group. Use a single ulysses (or ring) degree."
        )
    return next(iter(names), None)


def _is_split(node: fx.Node, world: int) -> bool:
    if node.op == "call_method" and node.target in _SPLITS:
        pieces = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("sections"))
    elif node.op == "call_function" and getattr(node.target, "__name__", "") in _SPLITS:
        pieces = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("sections"))
    else:
        return False
    return pieces == world


def _is_shard(node: fx.Node, world: int, rank: int) -> bool:
    """``split(x, W)[rank]`` with no other piece used: this rank's shard of a replicated value."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != rank:
        return False
    src = node.args[0]
    return isinstance(src, fx.Node) and _is_split(src, world) and len(src.users) == 1


def _is_gather(node: fx.Node) -> bool:
    # wait_tensor(all_gather(...)) or the gather itself: the result is whole on every rank.
    target = str(node.target)
    if node.op != "call_function" or _COLLECTIVE_NS not in target:
        return False
    if target.endswith("wait_tensor") and isinstance(node.args[0], fx.Node):
        return _is_gather(node.args[0])
    return any(target.endswith(g) or f".{g}." in target for g in _GATHERS)


def sharded_values(gm: fx.GraphModule, world: int, rank: int) -> set[fx.Node]:
    """Nodes of ``gm`` whose value differs per rank: derived from this rank's shard, not re-gathered."""
    sharded: set[fx.Node] = set()
    for node in gm.graph.nodes:  # topological order
        if _is_shard(node, world, rank):
            sharded.add(node)
        elif not _is_gather(node) and any(a in sharded for a in node.all_input_nodes):
            sharded.add(node)
    return sharded


def _numel(node: object) -> int:
    value = _value(node)
    if not isinstance(value, torch.Tensor):
        raise ParallelPlanError(f"block stream {node} has no example value to count its elements")
    return int(value.numel())


def block_reducers(gm: fx.GraphModule) -> list[Reducer]:
    """One reducer per outlined block call (``fastcache_block_<i>``), in block order.

    With collectives in the graph this makes one eager all-reduce of the blocks' local element
    counts (every rank builds the same variant at the same call), so the χ² threshold uses the
    exact global degrees of freedom even for uneven shards.
    """
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)]
    calls.sort(key=lambda n: int(str(n.target)[len(PREFIX) :]))
    group = collective_group(gm)
    if group is None:
        return [LOCAL for _ in calls]
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    sharded = sharded_values(gm, world, rank)
    masks = [tuple(c.args[p] in sharded for p in c.meta["fastcache_streams"]) for c in calls]
    if calls and not any(any(m) for m in masks):
        raise ParallelPlanError(
            f"the graph runs collectives over process group {group!r} but no block stream derives from a "
            f"sequence split (x.chunk({world})[{rank}] as diffusers' context-parallel plan emits), so the "
            "skip test cannot be reduced correctly. Shard inputs with model.enable_parallelism(...)."
        )
    counts = [[_numel(c.args[p]) for p in c.meta["fastcache_streams"]] for c in calls]
    local = [n if on else 0 for cnt, m in zip(counts, masks) for n, on in zip(cnt, m)]
    # gloo reduces CPU tensors; NCCL only accelerator ones.
    device = "cpu" if "gloo" in str(dist.get_backend(pg)) else torch.accelerator.current_accelerator()
    total = torch.tensor(local, dtype=torch.int64, device=device)
    dist.all_reduce(total, group=pg)
    total = total.cpu().tolist()
    out: list[Reducer] = []
    pos = 0
    for cnt, m in zip(counts, masks):
        dof = 0
        for n, on in zip(cnt, m):
            dof += int(total[pos]) if on else n
            pos += 1
        out.append(GroupStats(group, m, dof))
    return out
