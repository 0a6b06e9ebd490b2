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
last ``H`` computed residuals ``r̂_1 … r̂_H`` and the ``H`` steps at which they were computed (``H = 2``,
``r̂, r̂′, s, s′``, for the classic forms; ``H = K`` for the ``forecast`` form of order ``K``).
Inside ``fastcache_cached_i`` the branch is ``torch.ops.higher_order.cond`` on the chi-square test (or,
for ``forecast`` with conformal pairs, on the fitted error predictor against its conformal cutoff), so
the decision stays in the graph (no graph break, exportable as ONNX ``If``).

With ``audit=True`` every skipped block is also computed in-graph and the graph returns one more
output, a (num_blocks,) float32 tensor of relative output errors ``‖ŷ − y‖/‖y‖`` (worst output; 0
where the block computed): ``output = (*original_outputs, *state, computed, audit_errors)``.

``insert_recording`` builds the state-initialising variant used when no state exists yet (first call
of a generation or of a new input shape): every block computes and the graph returns the state it
produced, ``output = (*original_outputs, *state, computed)``, with no state inputs.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from .block_state import _PAIRS, _SHADOW, BlockLayout, RecordingBlock, _state_names, state_history
from .cached_block import CachedBlock
from .outline_blocks import PREFIX
from .reduce_stats import block_reducers

# re-exported: the exporters, segments and tests read them from here
__all__ = ["_PAIRS", "_SHADOW", "BlockLayout", "CachedBlock", "insert_cache", "insert_recording", "state_history"]


def _block_calls(gm: fx.GraphModule) -> list[fx.Node]:
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX)]
    return sorted(calls, key=lambda n: int(str(n.target)[len(PREFIX) :]))


def layouts(gm: fx.GraphModule, history: int = 2) -> list[BlockLayout]:
    return [
        BlockLayout(i, tuple(c.meta["fastcache_streams"]), tuple(c.meta["fastcache_pairs"]), history)
        for i, c in enumerate(_block_calls(gm))
    ]


def _rewrite(
    gm: fx.GraphModule, make_module, with_state_inputs: bool, history: int = 2, audit: bool = False
) -> fx.GraphModule:
    graph = gm.graph
    calls = _block_calls(gm)
    lays = layouts(gm, history)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    orig_out = output.args[0]
    orig_list = list(orig_out) if isinstance(orig_out, (tuple, list)) else [orig_out]

    names: list[str] = []
    if with_state_inputs:
        for lay in lays:
            names += _state_names(lay)
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
    errors: list[fx.Node] = []
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
        n_get = lay.num_state + 1 + audit  # state, computed flag, audited error
        with graph.inserting_after(new_call):
            getters = [graph.call_function(operator.getitem, (new_call, n_out + j)) for j in range(n_get)]
        state_outputs += getters[: lay.num_state]
        flags.append(getters[lay.num_state])
        errors += getters[lay.num_state + 1 :]
        gm.delete_submodule(str(call.target))

    with graph.inserting_before(output):
        stacked = graph.call_function(torch.stack, (flags,))
        audited = (graph.call_function(torch.stack, (errors,)),) if audit else ()
    output.args = ((*orig_list, *state_outputs, stacked, *audited),)
    gm.meta["fastcache_audit"] = audit
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
    audit: bool = False,
    max_skips: int | None = None,
) -> fx.GraphModule:
    """``audit=True`` computes every block and returns the skipped ones' true errors (module docstring);
    ``max_skips`` caps a block's consecutive skipped steps."""
    params = params or {}
    reducers = block_reducers(gm)

    def make(block: fx.GraphModule, lay: BlockLayout) -> CachedBlock:
        cached = CachedBlock(block, lay, tau, alpha, form, params.get(lay.index, {}), reducers[lay.index], audit)
        cached.max_skips = max_skips
        return cached

    return _rewrite(gm, make, True, state_history(form, params), audit)


def insert_recording(gm: fx.GraphModule, history: int = 2) -> fx.GraphModule:
    """The state-initialising variant; ``history`` must match the cached variant's (``state_history``)."""
    return _rewrite(gm, lambda block, lay: RecordingBlock(block, lay), False, history)
