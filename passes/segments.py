"""Split an outlined graph into static segments with the cache decision left to the host.

Before (from ``outline_blocks``)::

    glue_0 ─ out_0 = self.fastcache_block_0(*args_0) ─ glue_1 ─ out_1 = ... ─ glue_L ─ output

After ``split_segments`` a :class:`SegmentProgram`: for every block ``i``

    pre_i      glue before the block, plus δ²_i = ‖x − x̂‖²/‖x̂‖² of its streams (the last output)
    compute_i  the block itself and its residuals ``y − x``             (inputs: the block's arguments)
    predict_i  the skip-path prediction of every output                 (inputs: streams, state, step)

and ``post`` (the glue after the last block). No segment contains a ``torch.cond``: the host reads
δ²_i once, decides, and runs compute_i or predict_i (``fastcache_compile.segments.SegmentRunner``).
This is the form for targets that cannot take a data-dependent branch (TensorRT engines, CUDA
graphs); NVIDIA's DiT-caching deployment does the same (one engine per cacheable block).

The math is not duplicated: compute and predict wrap the ``CachedBlock`` that ``insert_cache`` would
build for the same block (its ``block`` submodule, ``_residuals``, ``_predict``, fitted buffers and
χ² threshold), so the two forms cannot drift apart without the equivalence tests failing. State
names and layout are those of ``insert_cache`` (``fc_<i>_x_hat_<j>`` ...).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from fastcache_compile import rule

from .insert_cache import BlockLayout, CachedBlock, _block_calls, layouts


@dataclass(frozen=True)
class SegmentSpec:
    """One static graph: the environment names it reads and the names it writes."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class BlockSpec:
    """How the host runs one block: statistic, decision, then one of two segments."""

    layout: BlockLayout
    pre: SegmentSpec  # last output: the statistic δ² (0-dim float32)
    compute: SegmentSpec  # outputs: y_0.., then the residuals r_0.. (what r̂ becomes)
    predict: SegmentSpec  # outputs: y_0.. (the same names as compute's first outputs)
    streams: tuple[str, ...]  # environment names of the stream inputs x_j
    state: tuple[str, ...]  # the block's state inputs, insert_cache's order
    aliases: tuple[tuple[str, int], ...]  # (graph node reading output k, k)
    threshold: float  # the χ² bound, rounded to float32 as the in-graph comparison does

    @property
    def statistic(self) -> str:
        return self.pre.outputs[-1]


@dataclass
class SegmentProgram:
    """A cond-free form of ``insert_cache``'s graph: same inputs, outputs and state layout."""

    inputs: tuple[str, ...]  # the graph's placeholders, then the state, fc_step, fc_force
    blocks: list[BlockSpec]
    post: SegmentSpec | None
    outputs: tuple[str, ...]  # environment names of the model's outputs
    modules: dict[str, fx.GraphModule] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)  # fastcache_layouts / _num_outputs / _output_is_seq

    def segments(self) -> list[SegmentSpec]:
        specs = [s for b in self.blocks for s in (b.pre, b.compute, b.predict)]
        return specs + ([self.post] if self.post is not None else [])


def state_names(lay: BlockLayout) -> list[str]:
    i = lay.index
    return [
        *[f"fc_{i}_x_hat_{j}" for j in range(len(lay.streams))],
        *[f"fc_{i}_r_hat_{k}" for k in range(len(lay.pairs))],
        *[f"fc_{i}_r_prev_{k}" for k in range(len(lay.pairs))],
        f"fc_{i}_s",
        f"fc_{i}_s_prev",
    ]


class ComputeSegment(nn.Module):
    """compute_i: the block, its outputs made contiguous, and their residuals (``CachedBlock``'s)."""

    def __init__(self, cached: CachedBlock, slots: list[int | None], consts: dict[int, object]) -> None:
        super().__init__()
        self.cached = cached
        self.slots, self.consts = slots, consts  # per block argument: its operand, or a baked constant

    def forward(self, *ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = tuple(self.consts[i] if s is None else ops[s] for i, s in enumerate(self.slots))
        # As the cond form's compute branch: contiguous copies (a block may hand an input back).
        outs = tuple(o.clone(memory_format=torch.contiguous_format) for o in self.cached.block(*args))
        return (*outs, *self.cached._residuals(args, outs))


class PredictSegment(nn.Module):
    """predict_i: ``CachedBlock._predict`` for every output, from streams, state and step."""

    def __init__(self, cached: CachedBlock, num_args: int) -> None:
        super().__init__()
        self.cached, self.num_args = cached, num_args

    def forward(self, *ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lay = self.cached.layout
        n_str, n_out = len(lay.streams), len(lay.pairs)
        args: list[object] = [None] * self.num_args  # the predictors read stream arguments only
        for pos, x in zip(lay.streams, ops[:n_str]):
            args[pos] = x
        st = ops[n_str : n_str + lay.num_state]
        x_hat, r_hat = list(st[:n_str]), list(st[n_str : n_str + n_out])
        r_prev = list(st[n_str + n_out : n_str + 2 * n_out])
        step = ops[-1].float()
        fitted = {name: getattr(self.cached, name) for name in self.cached._fitted}
        preds = (
            self.cached._predict(k, tuple(args), x_hat, r_hat, r_prev, step, st[-2], st[-1], fitted)
            for k in range(n_out)
        )
        return tuple(p.contiguous() for p in preds)


def _wrapper(module: nn.Module, inputs: list[str], num_outputs: int) -> fx.GraphModule:
    """A flat graph ``(*inputs) -> tuple`` around one module (what compile_fx and exporters take)."""
    graph = fx.Graph()
    phs = [graph.placeholder(n) for n in inputs]
    call = graph.call_module("seg", tuple(phs))
    graph.output(tuple(graph.call_function(operator.getitem, (call, k)) for k in range(num_outputs)))
    root = nn.Module()
    root.seg = module
    return fx.GraphModule(root, graph)


def _glue(
    gm: fx.GraphModule, nodes: list[fx.Node], keep: set[fx.Node], stat: tuple[list[fx.Node], list[str]] | None = None
) -> tuple[fx.GraphModule, list[str], list[str]]:
    """Copy ``nodes`` into a graph of their own; values defined elsewhere become placeholders.

    Outputs are the copied nodes read outside ``nodes`` (or in ``keep``); with ``stat = (streams,
    x_hat names)`` δ² of the streams against new ``x_hat`` placeholders is appended as the last output.
    """
    graph = fx.Graph()
    inside = set(nodes)
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []

    def external(n: fx.Node) -> fx.Node:
        if n not in inside and n not in env:
            env[n] = graph.placeholder(n.name)
            inputs.append(n.name)
        return n

    for node in nodes:  # placeholders first, in order of first use
        fx.map_arg((node.args, node.kwargs), external)
    for n in stat[0] if stat else []:
        external(n)
    x_hat = [graph.placeholder(name) for name in stat[1]] if stat else []
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    outs = [n for n in nodes if n in keep or any(u not in inside for u in n.users)]
    results = [env[n] for n in outs]
    if stat:
        # () float32, computed as CachedBlock does; the host reads it once
        results.append(graph.call_function(rule.relative_change, ([env[s] for s in stat[0]], x_hat)))
    graph.output(tuple(results))
    return fx.GraphModule(gm, graph), [*inputs, *stat[1]] if stat else inputs, [n.name for n in outs]


def _numel(node: fx.Node, block: fx.GraphModule, pos: int) -> int:
    val = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(val, torch.Tensor):  # getitem of a block call: the block's own placeholder knows
        ph = [n for n in block.graph.nodes if n.op == "placeholder"][pos]
        val = ph.meta.get("example_value", ph.meta.get("val"))
    return int(val.numel())


def split_segments(
    gm: fx.GraphModule,
    tau: float,
    alpha: float,
    form: str = "reuse",
    params: dict[int, dict[str, torch.Tensor]] | None = None,
) -> SegmentProgram:
    """The segment program of an outlined graph (``outline_blocks``' output); ``gm`` is not changed.

    Arguments are those of ``insert_cache``; the two forms give the same outputs, state and flags.
    """
    params = params or {}
    calls = _block_calls(gm)
    if not calls:
        raise ValueError("the graph has no outlined blocks: run find_blocks and outline_blocks first")
    lays = layouts(gm)
    call_set = set(calls)
    host = {
        n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem and n.args[0] in call_set
    }
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    out_val = output.args[0]
    out_nodes = list(out_val) if isinstance(out_val, (tuple, list)) else [out_val]
    if not all(isinstance(n, fx.Node) for n in out_nodes):
        raise ValueError("every graph output must be a traced value for the segment lowering")

    # Region r holds the glue between block r-1 and block r (graph order is topological).
    regions: list[list[fx.Node]] = [[] for _ in range(len(calls) + 1)]
    r = 0
    for node in gm.graph.nodes:
        if node in call_set:
            r += 1
        elif node.op not in ("placeholder", "output") and node not in host:
            regions[r].append(node)

    program = SegmentProgram(tuple(placeholders), [], None, tuple(n.name for n in out_nodes))
    all_state: list[str] = []
    for call, lay in zip(calls, lays):
        i = lay.index
        cached = CachedBlock(getattr(gm, call.target), lay, tau, alpha, form, params.get(i, {}))
        names = state_names(lay)
        all_state += names
        streams = [call.args[p] for p in lay.streams]

        pre_gm, pre_in, pre_out = _glue(gm, regions[i], set(out_nodes), (streams, names[: len(lay.streams)]))
        pre = SegmentSpec(f"pre_{i}", tuple(pre_in), (*pre_out, f"b{i}_delta2"))

        arg_names: list[str] = []
        slots: list[int | None] = []
        consts: dict[int, object] = {}
        for pos, a in enumerate(call.args):
            if isinstance(a, fx.Node):
                if a.name not in arg_names:
                    arg_names.append(a.name)
                slots.append(arg_names.index(a.name))
            else:
                slots.append(None)
                consts[pos] = a
        n_out = len(lay.pairs)
        ys = [f"b{i}_y{k}" for k in range(n_out)]
        compute = SegmentSpec(f"compute_{i}", tuple(arg_names), (*ys, *[f"b{i}_r{k}" for k in range(n_out)]))
        program.modules[compute.name] = _wrapper(ComputeSegment(cached, slots, consts), arg_names, 2 * n_out)
        stream_names = tuple(s.name for s in streams)
        pred_in = [*[f"b{i}_x{j}" for j in range(len(streams))], *names, "fc_step"]
        predict = SegmentSpec(f"predict_{i}", (*stream_names, *names, "fc_step"), tuple(ys))
        program.modules[predict.name] = _wrapper(PredictSegment(cached, len(call.args)), pred_in, n_out)
        program.modules[pre.name] = pre_gm

        dof = sum(_numel(call.args[p], cached.block, p) for p in lay.streams)
        thr = float(torch.tensor(cached._threshold(dof), dtype=torch.float32))
        aliases = tuple((u.name, int(u.args[1])) for u in call.users if u in host)
        program.blocks.append(BlockSpec(lay, pre, compute, predict, stream_names, tuple(names), aliases, thr))

    if regions[-1]:
        post_gm, post_in, post_out = _glue(gm, regions[-1], set(out_nodes))
        program.post = SegmentSpec("post", tuple(post_in), tuple(post_out))
        program.modules["post"] = post_gm
    program.inputs = (*program.inputs, *all_state, "fc_step", "fc_force")
    program.meta.update(
        fastcache_layouts=lays,
        fastcache_num_outputs=len(out_nodes),
        fastcache_output_is_seq=isinstance(out_val, (tuple, list)),
    )
    return program
