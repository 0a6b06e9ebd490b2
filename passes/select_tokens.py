"""Spatial token selection and kNN token merging around the block stack.

Before (from ``outline_blocks``)::

    x0 = <patch embedding ...>
    out_0 = self.fastcache_block_0(x0, temb, ...); ...; out_L = self.fastcache_block_L(...)
    y = getitem(out_L, 0); <final norm, unpatchify ...>

After ``split_stack`` the blocks and the glue between them are one submodule ``fastcache_stack_0``;
``insert_token_select`` replaces that call by a ``TokenStack`` whose branches are::

    full            every token; per-block cache (``insert_cache``) inside
    reduced(k[, m]) per sample the k most salient tokens (saliency ‖x0_i − x̂0_i‖² against the
                    last step that computed token i) are gathered, optionally merged to m
                    clusters, run through the stack re-specialised to that many tokens, and
                    scattered back; every other token gets x0_i + r̂_i (its cached residual)

chosen in-graph with nested ``torch.cond`` on the number of moving tokens rounded up to a bucket.
Every branch is static-shaped, so one compiled graph covers all buckets and no step recompiles.
The stack state ``x̂0, r̂`` (stack entry and stack residual per token) is functional like the
block state: inputs and outputs of the graph. The runtime module itself is in ``token_stack.py``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from fastcache_compile import tokens as T

from .insert_cache import _block_calls, insert_cache, insert_recording
from .outline_blocks import _value
from .reduce_stats import collective_group
from .retarget import RetargetError, clone_graph_module, retarget, verify_by_tiling
from .token_stack import STACK, TokenInput, TokenPlan, TokenStack, _InitStack, _stack_call, _wire, branches, gather_rows

_TILING_TOLERANCE = 1e-3


class TokenPlanError(RuntimeError):
    """Token selection cannot be applied to this graph (the caller falls back to block caching)."""


# -- graph surgery ---------------------------------------------------------------------------------
def _reach(start: fx.Node, step: Callable[[fx.Node], Any]) -> set[fx.Node]:
    """``start`` and every node reachable from it through ``step`` (users, or inputs)."""
    seen: set[fx.Node] = set()
    todo = [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(step(node))
    return seen


def split_stack(gm: fx.GraphModule) -> fx.GraphModule:
    """Fuse the outlined blocks and everything between them into one ``fastcache_stack_0`` call."""
    calls = _block_calls(gm)
    region = _reach(calls[0], lambda n: n.users) & _reach(calls[-1], lambda n: n.all_input_nodes)
    for call in calls:  # the blocks' output getitems travel with them
        region |= {u for u in call.users if u.op == "call_function" and u.target is operator.getitem}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    partition = {n: None for n in sorted(region, key=order.__getitem__)}
    fused = fuse_by_partitions(gm, [partition], prefix="fastcache_stack_", always_return_tuple=True)
    fused.meta.update(gm.meta)
    # The fuser creates placeholders where first used; later passes append state inputs after the
    # last placeholder, so all of them must come first.
    stack = getattr(fused, STACK)
    head = next(n for n in stack.graph.nodes if n.op != "placeholder")
    for ph in [n for n in stack.graph.nodes if n.op == "placeholder"]:
        head.prepend(ph)
    stack.recompile()
    return fused


def _capture_stack_args(gm: fx.GraphModule, args: Sequence[Any]) -> list[Any]:
    """The values entering the stack for these graph inputs (one eager run of the prologue)."""
    captured: list[Any] = []

    class _Stop(Exception):
        pass

    class Capture(fx.Interpreter):
        def call_module(self, target, args_, kwargs):
            if target == STACK:
                captured.extend(args_)
                raise _Stop
            return super().call_module(target, args_, kwargs)

    with torch.no_grad():
        try:
            Capture(gm).run(*args)
        except _Stop:
            pass
    return captured


def plan_tokens(gm: fx.GraphModule, stack_args: list[Any]) -> TokenPlan:
    """Which stack input / output carry the image tokens, and which inputs are per-token."""
    stack: fx.GraphModule = getattr(gm, STACK)
    call = _stack_call(gm)
    out_vals = [_value(a) for a in next(n for n in stack.graph.nodes if n.op == "output").args[0]]
    used = {u.args[1] for u in call.users if u.op == "call_function" and u.target is operator.getitem}
    first = _block_calls(stack)[0]
    stack_ph = [n for n in stack.graph.nodes if n.op == "placeholder"]
    stream_inputs = [
        stack_ph.index(first.args[p]) for p in first.meta["fastcache_streams"] if first.args[p] in stack_ph
    ]
    if not stream_inputs:
        raise TokenPlanError("the first block's hidden states do not enter the stack as an input")
    if any(not isinstance(a, torch.Tensor) for a in stack_args):
        raise TokenPlanError("a non-tensor value enters the block stack")
    shapes = {p: tuple(stack_args[p].shape) for p in stream_inputs}
    # The image stream: the stream whose final value leaves the stack (text streams end inside it).
    outs = [
        (j, v)
        for j, v in enumerate(out_vals)
        if j in used and isinstance(v, torch.Tensor) and any(tuple(v.shape) == s for s in shapes.values())
    ]
    if not outs:
        raise TokenPlanError("no stack output has the shape of a hidden-state stream")
    out, val = max(outs, key=lambda jv: jv[1].shape[1])
    matches = [p for p, s in shapes.items() if s == tuple(val.shape)]
    if len(matches) != 1:
        raise TokenPlanError("image and text streams have the same shape; cannot tell which tokens to select")
    stream = matches[0]
    batch, n = shapes[stream][0], shapes[stream][1]
    others = [shapes[p][1] for p in stream_inputs if p != stream]
    for j, v in enumerate(out_vals):
        if j != out and j in used and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == n:
            raise TokenPlanError(f"stack output {j} of shape {tuple(v.shape)} is per image token too")

    token_inputs: dict[int, TokenInput] = {}
    for p, a in enumerate(stack_args):
        if p in stream_inputs or isinstance(a, nn.Parameter) or stack_ph[p].name.lower().startswith("l_self_"):
            continue
        # A token axis is an axis of length N (or N + text length) before the last, feature, axis. A last
        # axis as long as a token axis makes a pair table (an attention bias): tokens on both sides.
        hits = [(d, size - n) for d, size in enumerate(a.shape[:-1]) if size == n or (size - n) in others]
        if not hits:
            continue
        if any(a.shape[d] == a.shape[-1] for d, _ in hits):
            hits.append((a.dim() - 1, hits[0][1]))
        if len(hits) > 1:
            raise TokenPlanError(f"input {stack_ph[p].name} {tuple(a.shape)} has several axes of token length")
        dim, offset = hits[0]
        if a.dim() >= 3 and dim >= 1 and a.shape[0] in (1, batch):
            token_inputs[p] = TokenInput(dim, False, offset)
        elif dim == 0:
            token_inputs[p] = TokenInput(0, True, offset)
        else:
            raise TokenPlanError(f"per-token input {stack_ph[p].name} {tuple(a.shape)} has no usable layout")
    return TokenPlan(len(stack_args), stream, out, len(out_vals), n, token_inputs)


def _small_args(plan: TokenPlan, stack_args: list[Any], k: int) -> list[Any]:
    x0 = stack_args[plan.stream]
    rows = torch.arange(k, device=x0.device).expand(x0.shape[0], k)
    small = list(stack_args)
    small[plan.stream] = T.gather(x0, rows)
    for p, spec in plan.token_inputs.items():
        small[p] = gather_rows(stack_args[p], rows, spec)
    return small


def reduced_stacks(
    gm: fx.GraphModule, plan: TokenPlan, stack_args: list[Any], counts: Sequence[int]
) -> dict[int, fx.GraphModule]:
    """The stack re-specialised to each token count in ``counts``, checked before use."""
    stack: fx.GraphModule = getattr(gm, STACK)
    x0 = stack_args[plan.stream]
    batch, n = x0.shape[0], x0.shape[1]
    others = {int(a.shape[1]) for p, a in enumerate(stack_args) if p != plan.stream and a.dim() == 3}

    def sizes(k: int) -> dict[int, int]:
        table = {n: k, batch * n: batch * k}
        table.update({n + m: k + m for m in others})
        return table

    single_stream = not any(t.offset for t in plan.token_inputs.values()) and not [
        c for c in _block_calls(stack) if len(c.meta["fastcache_streams"]) > 1
    ]
    reference: set | None = None
    if single_stream and n % 2 == 0 and n >= 4:
        # Check the substitution pattern numerically once, at k = N/2 (see verify_by_tiling).
        k = n // 2
        small = _small_args(plan, stack_args, k)
        try:
            verified, _, changes = retarget(stack, small, sizes(k))
        except RetargetError as err:
            raise TokenPlanError(f"cannot run the blocks on {k} of {n} tokens: {err}") from err
        err = verify_by_tiling(
            lambda a: list(stack(*a)),
            lambda a: list(verified(*a)),
            stack_args,
            small,
            plan.stream,
            {p: t.dim for p, t in plan.token_inputs.items()},
            plan.out,
            2,
        )
        if not err < _TILING_TOLERANCE:
            raise TokenPlanError(f"the stack re-specialised to {k} tokens disagrees with the original ({err:.2e})")
        reference = set(changes)
    out: dict[int, fx.GraphModule] = {}
    for k in sorted(set(counts)):
        small = _small_args(plan, stack_args, k)
        try:
            new, outs, changes = retarget(stack, small, sizes(k))
        except RetargetError as err:
            raise TokenPlanError(f"cannot run the blocks on {k} of {n} tokens: {err}") from err
        if reference is not None and set(changes) != reference:
            raise TokenPlanError(f"token count {k} is ambiguous with another size in the blocks")
        if tuple(outs[plan.out].shape) != (batch, k, x0.shape[2]):
            raise TokenPlanError(f"blocks on {k} tokens returned shape {tuple(outs[plan.out].shape)}")
        out[k] = new
    return out


def insert_token_select(
    outlined: fx.GraphModule,
    args: Sequence[Any],
    *,
    tau: float,
    alpha: float,
    form: str,
    params: dict[int, dict[str, torch.Tensor]] | None,
    buckets: Sequence[float],
    select: bool,
    token_threshold: float,
    merge: bool,
    merge_ratio: float,
    merge_k: int,
    merge_lambda: float,
    static_w: torch.Tensor | None = None,
    max_skips: int | None = None,
) -> tuple[fx.GraphModule, fx.GraphModule, TokenPlan]:
    """The ``init`` and ``cached`` graphs with token selection; raises ``TokenPlanError`` if unsupported."""
    group = collective_group(outlined)
    if group is not None:
        # Each rank holds a sequence shard: per-rank top-k and kNN merging would pick different token
        # counts on each rank and break the shape agreement of the all-to-all.
        raise TokenPlanError(f"the graph runs context parallel collectives over process group {group!r}")
    if form == "forecast":
        # the token stack's state keeps two residuals per block; the forecaster's K-step history is not wired
        raise TokenPlanError("approximation='forecast' is not supported with token selection yet")
    gm = split_stack(clone_graph_module(outlined))
    stack_args = _capture_stack_args(gm, args)
    plan = plan_tokens(gm, stack_args)
    branch_list = branches(plan.num_tokens, buckets, select, merge, merge_ratio)
    reduced = reduced_stacks(gm, plan, stack_args, [b.run for b in branch_list])
    stack: fx.GraphModule = getattr(gm, STACK)
    num_blocks = len(_block_calls(stack))

    cached_stack = insert_cache(clone_graph_module(stack), tau, alpha, form, params, max_skips=max_skips)
    lays = cached_stack.meta["fastcache_layouts"]
    n_bs = sum(lay.num_state for lay in lays)
    token_stack = TokenStack(
        cached_stack, reduced, plan, branch_list, n_bs, num_blocks, token_threshold, merge_k, merge_lambda, static_w
    )
    cached = _wire(clone_graph_module(gm), token_stack, n_bs, plan, with_state=True)
    cached.meta["fastcache_layouts"] = lays

    init_stack = _InitStack(insert_recording(clone_graph_module(stack)), plan)
    init = _wire(clone_graph_module(gm), init_stack, n_bs, plan, with_state=False)
    init.meta["fastcache_layouts"] = lays
    return init, cached, plan
