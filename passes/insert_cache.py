"""Wrap every outlined block in a conditional cache-reuse branch with explicit functional state.

Before (from ``outline_blocks``)::

    out_i = self.fastcache_block_i(*args)        # tuple of the block's outputs
    y = getitem(out_i, k)

After ``insert_cache``::

    res_i = self.fastcache_cached_i(*args, *state_i, step, force)
    y = getitem(res_i, k)                        # the block's outputs, computed or predicted
    # the graph additionally returns every block's updated state and a (num_blocks,) bool tensor
    # of "computed" flags: output = (*original_outputs, *state, computed)

``state_i`` are new placeholders: per stream input the last computed input ``x̂``, per output its
last two computed residuals ``r̂, r̂′`` and the steps ``s, s′`` at which they were computed.
Inside ``fastcache_cached_i`` the branch is ``torch.ops.higher_order.cond`` on the chi-square test,
so the decision stays in the graph (no graph break, exportable as ONNX ``If``).

``insert_recording`` builds the state-initialising variant used when no state exists yet (first call
of a generation or of a new input shape): every block computes and the graph returns the state it
produced, ``output = (*original_outputs, *state, computed)``, with no state inputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from fastcache_compile import approx, rule

from .outline_blocks import PREFIX
from .reduce_stats import LOCAL, Reducer, block_reducers

# Active shadow recorders (see ``fastcache_compile.runtime.shadow_errors``).
_SHADOW: list[list[tuple[int, float]]] = []


@dataclass(frozen=True)
class BlockLayout:
    """How one block's state is laid out in the flat state list."""

    index: int
    streams: tuple[int, ...]  # argument positions holding hidden states
    pairs: tuple[int | None, ...]  # per output: the stream argument it updates, or None

    @property
    def num_state(self) -> int:
        return len(self.streams) + 2 * len(self.pairs) + 2


class _BlockBase(nn.Module):
    def __init__(self, block: fx.GraphModule, layout: BlockLayout) -> None:
        super().__init__()
        self.block = block
        self.layout = layout

    def _residuals(self, args: tuple, outs: tuple) -> list[torch.Tensor]:
        # Paired outputs are stored as residuals y − x (what the predictors extrapolate), unpaired
        # ones as plain values.
        return [o if p is None else o - args[p].to(o.dtype) for o, p in zip(outs, self.layout.pairs)]


class RecordingBlock(_BlockBase):
    """Always computes; returns (outputs..., state..., computed)."""

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, step = flat[:-1], flat[-1]
        outs = tuple(self.block(*args))
        res = self._residuals(args, outs)
        # State is kept contiguous so compiled variants see one fixed layout for it.
        x_hat = [args[p].contiguous() for p in self.layout.streams]
        s = step.float()
        # r̂′ starts equal to r̂ (no trajectory yet) but must be its own tensor: cond operands may
        # not alias each other.
        state = [*x_hat, *res, *[r.clone() for r in res], s, s - 1.0]
        return (*outs, *state, torch.ones((), dtype=torch.bool, device=step.device))


class CachedBlock(_BlockBase):
    """Runs the block or its predictor under ``torch.cond``; returns (outputs..., state..., computed)."""

    def __init__(
        self,
        block: fx.GraphModule,
        layout: BlockLayout,
        tau: float,
        alpha: float,
        form: str,
        params: dict[str, torch.Tensor],
        reducer: Reducer = LOCAL,
    ) -> None:
        super().__init__(block, layout)
        self.tau, self.alpha, self.form = tau, alpha, form
        # Under context parallelism the statistic and its dof cover every rank's shard (reduce_stats).
        self.reducer = reducer
        self._fitted = sorted(name.replace(".", "_") for name in params)
        for name, value in params.items():
            self.register_buffer(name.replace(".", "_"), value, persistent=False)
        self._thresholds: dict[int, float] = {}

    def _threshold(self, dof: int) -> float:
        if dof not in self._thresholds:
            self._thresholds[dof] = rule.skip_threshold(self.tau, self.alpha, dof)
        return self._thresholds[dof]

    def _predict(self, k: int, args: tuple, x_hat: list, r_hat: list, r_prev: list, step, s, s_prev, fitted: dict):
        p = self.layout.pairs[k]
        if p is None:
            return r_hat[k].clone()  # no input of the same shape: reuse the cached output
        x = args[p].to(r_hat[k].dtype)
        xh = x_hat[self.layout.streams.index(p)].to(x.dtype)
        if self.form == "trajectory":
            return approx.trajectory(x, r_hat[k], r_prev[k], step, s, s_prev, fitted["beta"])
        if self.form == "linear":
            return approx.linear(x, xh, r_hat[k], fitted[f"a_{k}"])
        if self.form == "direct":
            return approx.direct(x, fitted[f"w_{k}"], fitted[f"b_{k}"])
        return approx.reuse(x, r_hat[k])

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lay = self.layout
        n_out, n_str = len(lay.pairs), len(lay.streams)
        n_args = len(flat) - lay.num_state - 2
        args = flat[:n_args]
        state = flat[n_args : n_args + lay.num_state]
        step, force = flat[-2], flat[-1]
        x_hat = list(state[:n_str])
        r_hat = list(state[n_str : n_str + n_out])
        r_prev = list(state[n_str + n_out : n_str + 2 * n_out])
        s, s_prev = state[-2], state[-1]
        xs = [args[p] for p in lay.streams]
        delta2 = self.reducer.relative_change(xs, x_hat)  # () float32, the same on every rank
        dof = self.reducer.dof(xs)
        compute = rule.should_compute(delta2, self._threshold(dof), force)

        tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        consts = {i: a for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}
        n_t = len(tensor_pos)

        def rebuild(ops: tuple) -> tuple:
            full = dict(consts)
            full.update(zip(tensor_pos, ops[:n_t]))
            return tuple(full[i] for i in range(n_args))

        def run_block(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outs = tuple(self.block(*rebuild(ops)))
            # cond branches may not return (views of) their operands, and a block may hand an input
            # back through a no-op ``.to(dtype)``; the copy is one elementwise pass per output.
            # Both branches return contiguous tensors: cond needs matching strides, and a predictor
            # built on a transposed input (patch embedding) would not be.
            return tuple(o.clone(memory_format=torch.contiguous_format) for o in outs)

        n_fit = len(self._fitted)

        def predict(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a = rebuild(ops)
            st = ops[n_t : len(ops) - n_fit]
            fitted = dict(zip(self._fitted, ops[len(ops) - n_fit :]))
            xh, rh = list(st[:n_str]), list(st[n_str : n_str + n_out])
            rp = list(st[n_str + n_out : n_str + 2 * n_out])
            stp, s_, sp_ = st[-3], st[-2], st[-1]
            preds = (self._predict(k, a, xh, rh, rp, stp, s_, sp_, fitted) for k in range(n_out))
            return tuple(p.contiguous() for p in preds)

        # The fitted maps are operands (not closure constants) so tracers and exporters see them as
        # inputs of the branch.
        fitted_values = [getattr(self, name) for name in self._fitted]
        operands = (
            *[args[i] for i in tensor_pos],
            *x_hat,
            *r_hat,
            *r_prev,
            step.float(),
            s,
            s_prev,
            *fitted_values,
        )
        # Inductor traces each branch with its operands' strides but may hand the branch a buffer of
        # another layout (e.g. the transposed patch embedding); contiguous operands avoid the mismatch.
        if _tracing(operands):
            # ``.contiguous()`` alone can be dropped by Inductor; force the layout it must have.
            operands = tuple(torch.ops.prims.inductor_force_stride_order(o, _contiguous_strides(o)) for o in operands)
        else:
            operands = tuple(o.contiguous() for o in operands)
        outs = torch.ops.higher_order.cond(compute, run_block, predict, operands)
        outs = tuple(outs)
        if _SHADOW and not _tracing(operands) and not bool(compute):
            # Benchmark-only check of the error bound (eager lowering): what would the block have given?
            true = run_block(*operands)
            err = max(float((o - t).norm() / t.norm().clamp_min(1e-12)) for o, t in zip(outs, true))
            _SHADOW[-1].append((self.layout.index, err))

        # Functional state update: keep the old state where the block was skipped.
        res = self._residuals(args, outs)
        new_x_hat = [torch.where(compute, x, xh).contiguous() for x, xh in zip(xs, x_hat)]
        new_r_hat = [torch.where(compute, r, rh) for r, rh in zip(res, r_hat)]
        new_r_prev = [torch.where(compute, rh, rp) for rh, rp in zip(r_hat, r_prev)]
        new_s = torch.where(compute, step.float(), s)
        new_s_prev = torch.where(compute, s, s_prev)
        state_out = [*new_x_hat, *new_r_hat, *new_r_prev, new_s, new_s_prev]
        return (*outs, *state_out, compute)


def _tracing(tensors: tuple[torch.Tensor, ...]) -> bool:
    """True while AOTAutograd / export trace the module (then layouts must be forced explicitly)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def _contiguous_strides(t: torch.Tensor) -> list[int]:
    strides, acc = [], 1
    for size in reversed(t.shape):
        strides.append(acc)
        acc *= max(int(size), 1)
    return strides[::-1]


def _block_calls(gm: fx.GraphModule) -> list[fx.Node]:
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)]
    return sorted(calls, key=lambda n: int(str(n.target)[len(PREFIX) :]))


def layouts(gm: fx.GraphModule) -> list[BlockLayout]:
    return [
        BlockLayout(i, tuple(c.meta["fastcache_streams"]), tuple(c.meta["fastcache_pairs"]))
        for i, c in enumerate(_block_calls(gm))
    ]


def _rewrite(gm: fx.GraphModule, make_module, with_state_inputs: bool) -> fx.GraphModule:
    graph = gm.graph
    calls = _block_calls(gm)
    lays = layouts(gm)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    orig_out = output.args[0]
    orig_list = list(orig_out) if isinstance(orig_out, (tuple, list)) else [orig_out]

    names: list[str] = []
    if with_state_inputs:
        for lay in lays:
            i = lay.index
            names += [f"fc_{i}_x_hat_{j}" for j in range(len(lay.streams))]
            names += [f"fc_{i}_r_hat_{k}" for k in range(len(lay.pairs))]
            names += [f"fc_{i}_r_prev_{k}" for k in range(len(lay.pairs))]
            names += [f"fc_{i}_s", f"fc_{i}_s_prev"]
    names += ["fc_step", "fc_force"] if with_state_inputs else ["fc_step"]
    new_inputs: list[fx.Node] = []
    anchor = placeholders[-1]
    for name in names:
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(name)
        new_inputs.append(anchor)
    step_node = new_inputs[-2] if with_state_inputs else new_inputs[-1]
    force_node = new_inputs[-1] if with_state_inputs else None

    state_outputs: list[fx.Node] = []
    flags: list[fx.Node] = []
    cursor = 0
    for call, lay in zip(calls, lays):
        n_out = len(lay.pairs)
        block = getattr(gm, call.target)
        name = f"fastcache_cached_{lay.index}"
        gm.add_submodule(name, make_module(block, lay))
        extra: list[fx.Node] = []
        if with_state_inputs:
            extra = [*new_inputs[cursor : cursor + lay.num_state], step_node, force_node]
            cursor += lay.num_state
        else:
            extra = [step_node]
        with graph.inserting_after(call):
            new_call = graph.call_module(name, tuple(call.args) + tuple(extra))
        for user in list(call.users):
            user.replace_input_with(call, new_call)
        graph.erase_node(call)
        with graph.inserting_after(new_call):
            getters = [graph.call_function(operator.getitem, (new_call, n_out + j)) for j in range(lay.num_state + 1)]
        state_outputs += getters[:-1]
        flags.append(getters[-1])
        gm.delete_submodule(str(call.target))

    with graph.inserting_before(output):
        stacked = graph.call_function(torch.stack, (flags,))
    output.args = ((*orig_list, *state_outputs, stacked),)
    gm.meta["fastcache_layouts"] = lays
    gm.meta["fastcache_num_outputs"] = len(orig_list)
    gm.meta["fastcache_output_is_seq"] = isinstance(orig_out, (tuple, list))
    graph.lint()
    gm.recompile()
    return gm


def insert_cache(
    gm: fx.GraphModule,
    tau: float,
    alpha: float,
    form: str = "reuse",
    params: dict[int, dict[str, torch.Tensor]] | None = None,
) -> fx.GraphModule:
    params = params or {}
    reducers = block_reducers(gm)
    return _rewrite(
        gm,
        lambda block, lay: CachedBlock(block, lay, tau, alpha, form, params.get(lay.index, {}), reducers[lay.index]),
        True,
    )


def insert_recording(gm: fx.GraphModule) -> fx.GraphModule:
    return _rewrite(gm, lambda block, lay: RecordingBlock(block, lay), False)
