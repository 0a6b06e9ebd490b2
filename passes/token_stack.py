"""The runtime module of token selection: the bucketed branches around the block stack.

``TokenStack`` replaces the stack call that ``insert_token_select`` (``select_tokens.py``) found. Its
branches are chosen in-graph with nested ``torch.cond`` on the number of moving tokens:

    full            every token; per-block cache (``insert_cache``) inside
    reduced(k[, m]) per sample the k most salient tokens are gathered, optionally merged to m
                    clusters, run through the stack re-specialised to that many tokens, and scattered
                    back; every other token gets x0_i + r̂_i (its cached residual)

The outer cond takes the full branch when no reduced bucket holds the moving tokens (or the step is
forced); its other branch is the chain of conds over the reduced buckets, smallest first.

``_InitStack`` is the first call of a generation: every block on every token, emitting the state.
``_wire`` puts either module in place of the stack call and adds the state to the graph's inputs and outputs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from fastcache_compile import approx
from fastcache_compile import tokens as T

from .block_state import _contiguous_strides, _own, _tracing

STACK = "fastcache_stack_0"  # the fused block stack's submodule (``select_tokens.split_stack``)


def _stack_call(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == STACK)


@dataclass(frozen=True)
class TokenInput:
    """A per-token input beside the hidden states (RoPE rows, position ids) and how to gather it."""

    dim: int  # its token axis
    shared: bool  # no batch axis: one row set serves the whole batch
    offset: int  # rows [0, offset) belong to a concatenated text sequence and always stay


@dataclass(frozen=True)
class TokenPlan:
    num_inputs: int
    stream: int  # stack input holding the image tokens entering the stack
    out: int  # stack output holding their final value
    num_outputs: int
    num_tokens: int
    token_inputs: dict[int, TokenInput]

    @property
    def shared(self) -> bool:
        # A batch-free positional input admits one token set per batch; values never mix.
        return any(t.shared for t in self.token_inputs.values())


def gather_rows(t: torch.Tensor, rows: torch.Tensor, spec: TokenInput) -> torch.Tensor:
    """The rows of a per-token input that belong to the gathered tokens ``rows`` (B, r)."""
    if spec.offset:
        keep = torch.arange(spec.offset, device=rows.device).expand(rows.shape[0], spec.offset)
        rows = torch.cat([keep, rows + spec.offset], dim=1)
    if spec.shared:
        return t.index_select(spec.dim, rows[0])
    t = t.expand(rows.shape[0], *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[spec.dim] = rows.shape[0], rows.shape[1]
    index = rows.reshape(shape)
    expand = list(t.shape)
    expand[spec.dim] = rows.shape[1]
    return t.gather(spec.dim, index.expand(expand))


# -- the runtime module ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Branch:
    select: int  # tokens gathered per sample
    run: int  # tokens the blocks run on (< select when merging)


def branches(n: int, buckets: Sequence[float], select: bool, merge: bool, merge_ratio: float) -> list[Branch]:
    """Reduced branches, smallest first; the full-size bucket is the full branch, not listed here."""
    sizes = sorted({max(1, math.ceil(f * n)) for f in buckets}) if select else [n]
    out = []
    for k in sizes:
        m = max(1, math.ceil(k * (1.0 - merge_ratio))) if merge else k
        if m < n:
            out.append(Branch(k, m))
    return out


class TokenStack(nn.Module):
    """``(*stack_inputs, *block_state, x̂0, r̂, step, force)`` →
    ``(*stack_outputs, *block_state', computed, x̂0', r̂', tokens_run)``."""

    def __init__(
        self,
        full: fx.GraphModule,
        reduced: dict[int, fx.GraphModule],
        plan: TokenPlan,
        branch_list: list[Branch],
        num_block_state: int,
        num_blocks: int,
        token_threshold: float,
        merge_k: int,
        merge_lambda: float,
        static_w: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.full = full
        # W_s of the static-token correction; an operand of the branches like the block maps.
        self.has_w = static_w is not None
        if static_w is not None:
            self.register_buffer("static_w", static_w, persistent=False)
        # The block maps of the full stack (β, A − I, ...) must enter the branches as operands too:
        # a buffer read inside a traced cond branch would be a closure over a tensor of the outer trace.
        self._full_buffers = [name for name, _ in full.named_buffers()]
        self._n_flat = plan.num_inputs + num_block_state + 4  # stack inputs, block state, x̂0, r̂, step, force
        self.reduced = nn.ModuleDict({str(k): g for k, g in reduced.items()})
        self.plan = plan
        self.branch_list = branch_list
        self.num_block_state = num_block_state
        self.num_blocks = num_blocks
        self.token_threshold = token_threshold
        self.merge_k = merge_k
        self.merge_lambda = merge_lambda

    def _unpack(self, ops: Sequence[torch.Tensor]) -> tuple:
        n_in, n_bs = self.plan.num_inputs, self.num_block_state
        inputs = list(ops[:n_in])
        bstate = list(ops[n_in : n_in + n_bs])
        xh0, rh, step, force = ops[n_in + n_bs : n_in + n_bs + 4]
        return inputs, bstate, xh0, rh, step, force

    def _full(self, *ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, bstate, _, _, step, force = self._unpack(ops)
        buffers = dict(zip(self._full_buffers, ops[len(ops) - len(self._full_buffers) :]))
        res = list(torch.func.functional_call(self.full, buffers, (*inputs, *bstate, step, force)))
        n_out = self.plan.num_outputs
        outs, new_bstate, computed = res[:n_out], res[n_out:-1], res[-1]
        x0, y = inputs[self.plan.stream], outs[self.plan.out]
        run = torch.full((), float(self.plan.num_tokens), device=x0.device)
        return (*map(_own, outs), *map(_own, new_bstate), computed.clone(), _own(x0), _own(y - x0), run)

    def _reduced(self, branch: Branch) -> Callable[..., tuple[torch.Tensor, ...]]:
        plan = self.plan

        def run(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            inputs, bstate, xh0, rh, _, _ = self._unpack(ops)
            # operands after the flat inputs: moving count, saliency, W_s (if fitted), full-stack maps
            sal, static_w = ops[self._n_flat + 1], (ops[self._n_flat + 2] if self.has_w else None)
            x0 = inputs[plan.stream]
            if plan.shared:
                sal = sal.amax(0, keepdim=True).expand_as(sal)
            idx = T.select(sal, branch.select)  # (B, k): per sample, in token order
            xk = T.gather(x0, idx)
            rows, h = idx, xk
            if branch.run < branch.select:
                sal_k = sal.gather(1, idx)
                temporal = sal_k / sal_k.amax(-1, keepdim=True).clamp_min(1e-12)
                score = T.importance(T.knn_density(xk, self.merge_k), temporal, self.merge_lambda)
                if plan.shared:  # batch-free positions: the same centres in every sample
                    score = score.mean(0, keepdim=True).expand_as(score)
                h, assign, centres = T.merge(xk, score, branch.run)
                rows = idx.gather(1, centres)
            small = list(inputs)
            small[plan.stream] = h
            for p, spec in plan.token_inputs.items():
                small[p] = gather_rows(inputs[p], rows, spec)
            outs = list(self.reduced[str(branch.run)](*small))
            r = outs[plan.out] - h
            if branch.run < branch.select:
                r = T.unmerge(r, assign)  # every member of a cluster gets its cluster's update
            # Static tokens: stack entry plus their cached stack residual, corrected by W_s if fitted.
            if static_w is None:
                static = approx.reuse(x0, rh.to(x0.dtype))
            else:
                static = approx.linear(x0, xh0.to(x0.dtype), rh.to(x0.dtype), static_w)
            outs[plan.out] = T.scatter(static, idx, xk + r)
            new_xh0 = T.scatter(xh0, idx, xk.to(xh0.dtype))
            new_rh = T.scatter(rh, idx, r.to(rh.dtype))
            computed = torch.ones(self.num_blocks, dtype=torch.bool, device=x0.device)
            count = torch.full((), float(branch.run), device=x0.device)
            return (*map(_own, outs), *map(_own, bstate), computed, new_xh0, new_rh, count)

        return run

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, _, xh0, _, _, _ = self._unpack(flat)
        x0 = inputs[self.plan.stream]
        sal = T.saliency(x0, xh0)  # (B, N): decides the bucket here and the top-k in the branch
        moving = T.moving_count(sal, xh0, self.token_threshold)  # () int64, max over batch
        # ``moving``, ``sal`` (and the maps) ride along as operands: cond branches may not close over
        # traced tensors.
        fitted = [self.static_w] if self.has_w else []
        fitted += [self.full.get_buffer(name) for name in self._full_buffers]
        operands = (*flat, moving, sal, *fitted)
        n_flat = self._n_flat
        if _tracing(operands):  # as in CachedBlock: a forced layout, and no operand aliases another
            operands = tuple(torch.ops.prims.inductor_force_stride_order(o, _contiguous_strides(o)) for o in operands)
        else:
            operands = tuple(o.contiguous() for o in operands)

        if not self.branch_list:
            return self._full(*operands)
        last = len(self.branch_list) - 1

        def choose(i: int) -> Callable[..., tuple[torch.Tensor, ...]]:
            """The reduced branches from ``i`` on, smallest first; the largest is taken when none before fits."""
            if i == last:
                return self._reduced(self.branch_list[i])
            branch = self.branch_list[i]

            def pick(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
                fits = ops[n_flat] <= branch.select
                return tuple(torch.ops.higher_order.cond(fits, self._reduced(branch), choose(i + 1), ops))

            return pick

        # The full branch sits directly under the outer cond, not at the end of the bucket chain: its
        # per-block conds are re-traced and fake-run once per enclosing cond, so nesting it under every
        # bucket multiplied the tracing cost (``benchmarks/compile_time.py``).
        force, moving = operands[n_flat - 1], operands[n_flat]
        fits = torch.logical_and(moving <= self.branch_list[last].select, torch.logical_not(force))
        return tuple(torch.ops.higher_order.cond(fits, choose(0), self._full, operands))


class _InitStack(nn.Module):
    """First call of a generation: every block on every token; emits the block and stack state."""

    def __init__(self, recording: fx.GraphModule, plan: TokenPlan) -> None:
        super().__init__()
        self.recording = recording
        self.plan = plan

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, step = flat[:-1], flat[-1]
        res = list(self.recording(*inputs, step))
        n_out = self.plan.num_outputs
        outs, bstate, computed = res[:n_out], res[n_out:-1], res[-1]
        x0, y = inputs[self.plan.stream], outs[self.plan.out]
        run = torch.full((), float(self.plan.num_tokens), device=x0.device)
        # x̂0 must be its own tensor: block 0's state already holds x0, and state inputs may not alias.
        return (*outs, *bstate, computed, _own(x0), (y - x0).contiguous(), run)


def _wire(gm: fx.GraphModule, module: nn.Module, n_bs: int, plan: TokenPlan, with_state: bool) -> fx.GraphModule:
    """Call ``module`` in place of the stack; graph output becomes
    ``(*outputs, *block_state, x̂0, r̂, computed, tokens_run)``."""
    graph = gm.graph
    call = _stack_call(gm)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [f"fc_state_{i}" for i in range(n_bs)] + ["fc_x0_hat", "fc_r_hat", "fc_step", "fc_force"]
    if not with_state:
        names = ["fc_step"]
    anchor, new_inputs = placeholders[-1], []
    for name in names:
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        new_inputs.append(anchor)
    gm.add_submodule("fastcache_tokens", module)
    with graph.inserting_after(call):
        new_call = graph.call_module("fastcache_tokens", (*call.args, *new_inputs))
    call.replace_all_uses_with(new_call)
    graph.erase_node(call)
    gm.delete_submodule(STACK)
    n_out = plan.num_outputs
    with graph.inserting_after(new_call):
        get = [graph.call_function(operator.getitem, (new_call, n_out + j)) for j in range(n_bs + 4)]
    bstate, computed, xh0, rh, count = get[:n_bs], get[n_bs], get[n_bs + 1], get[n_bs + 2], get[n_bs + 3]
    output = next(n for n in graph.nodes if n.op == "output")
    orig = output.args[0]
    orig_list = list(orig) if isinstance(orig, (tuple, list)) else [orig]
    output.args = ((*orig_list, *bstate, xh0, rh, computed, count),)
    gm.meta["fastcache_num_outputs"] = len(orig_list)
    gm.meta["fastcache_output_is_seq"] = isinstance(orig, (tuple, list))
    graph.lint()
    gm.recompile()
    return gm
