"""Retarget a static-shaped block stack from N to k hidden-state tokens.

Dynamo bakes sizes into the graph: ``view(2, -1, 8, 64)`` is harmless, but a joint-attention block
splits its concatenated sequence with ``x[:, :4096]`` and a hand-written attention reshapes with
``reshape(B, N, 3, H, d)``. To run the same blocks on a gathered subset of ``k`` tokens, every int
that *is* the token count must become ``k`` and every other int must stay.

Which ints are token counts is decided by running the graph on real inputs of the new size, node by
node: slicing on an axis whose length changed gets its bounds moved (``N → k``, ``N + M → k + M``);
any other op first runs unchanged and only when that fails tries the fewest, earliest substitutions
that make it run. The result is checked by ``verify_by_tiling`` where a numeric check exists, and the
caller refuses the model (block-level caching only) when anything fails.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

_SPLIT_METHODS = {"split", "split_with_sizes", "tensor_split", "narrow"}
_MAX_CANDIDATES = 6  # ints per op considered for substitution (2**6 subsets at most)


class RetargetError(RuntimeError):
    """The block stack could not be re-specialised to another token count."""


def _leaves(value: Any, path: tuple = ()) -> list[tuple[tuple, int]]:
    """(path, int) for every int inside nested tuples / lists / slices / dicts of an op's arguments."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [(path, value)]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    if isinstance(value, slice):
        return [leaf for i, v in enumerate((value.start, value.stop, value.step)) for leaf in _leaves(v, (*path, i))]
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    return []


def _set(value: Any, path: tuple, new: int) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, slice):
        parts = [value.start, value.stop, value.step]
        parts[head] = _set(parts[head], rest, new)
        return slice(*parts)
    if isinstance(value, dict):
        return {**value, head: _set(value[head], rest, new)}
    items = list(value)
    items[head] = _set(items[head], rest, new)
    return type(value)(items) if isinstance(value, tuple) else items


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class _Retargeter:
    def __init__(self, sizes: dict[int, int]) -> None:
        self.sizes = sizes  # old int → new int (N → k, N + M → k + M, B·N → B·k)
        self.changes: list[tuple[str, tuple]] = []  # (qualified node name, path) of every substitution

    def run(self, gm: fx.GraphModule, args: Sequence[Any], prefix: str = "") -> list[Any]:
        env: dict[fx.Node, Any] = {}
        placeholders = iter(args)
        result: list[Any] = []
        for node in list(gm.graph.nodes):
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "get_attr":
                env[node] = getattr(gm, str(node.target))
            elif node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[n])
            elif node.op == "call_module":
                sub = getattr(gm, str(node.target))
                vals = fx.node.map_arg(node.args, lambda n: env[n])
                if isinstance(sub, fx.GraphModule):
                    env[node] = self.run(sub, vals, f"{prefix}{node.target}.")
                else:
                    env[node] = sub(*vals)
            else:
                env[node] = self._call(node, env, prefix)
        return result

    def _apply(self, node: fx.Node, env: dict[fx.Node, Any], args: tuple, kwargs: dict) -> Any:
        a = fx.node.map_arg(args, lambda n: env[n])
        kw = fx.node.map_arg(kwargs, lambda n: env[n])
        if node.op == "call_method":
            return getattr(a[0], str(node.target))(*a[1:], **kw)
        return node.target(*a, **kw)

    def _call(self, node: fx.Node, env: dict[fx.Node, Any], prefix: str) -> Any:
        leaves = [(("a", *p), v) for p, v in _leaves(node.args)] + [(("k", *p), v) for p, v in _leaves(node.kwargs)]
        cands = [(p, v) for p, v in leaves if v in self.sizes]
        if not cands:
            return self._apply(node, env, node.args, node.kwargs)
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(env[node.args[0]], torch.Tensor)
        ):
            # Slicing never fails on a wrong bound, so decide by the axis: bounds on an axis whose
            # length changed are token positions.
            before, now = _shape(node.args[0]), tuple(env[node.args[0]].shape)
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if before is None or Ellipsis in index or None in index:
                raise RetargetError(f"cannot tell the token axis of slice {node.format_node()}")
            is_tuple = isinstance(node.args[1], tuple)

            def axis(path: tuple) -> int | None:
                # path: ("a", 1, <position in the index tuple>, <slice part>) or ("a", 1, <slice part>)
                if path[1] != 1 or len(path) != (4 if is_tuple else 3):
                    return None
                ax = path[2] if is_tuple else 0
                return ax if isinstance(index[ax], slice) else None

            chosen = [(p, v) for p, v in cands if axis(p) is not None and before[axis(p)] != now[axis(p)]]
            return self._substitute(node, env, chosen, prefix)
        if len(cands) > _MAX_CANDIDATES:
            raise RetargetError(f"too many size-like ints in {node.format_node()}")
        errors = []
        for r in range(len(cands) + 1):  # fewest substitutions first, earliest positions first
            for subset in itertools.combinations(cands, r):
                try:
                    return self._substitute(node, env, list(subset), prefix)
                except (RuntimeError, ValueError, IndexError, TypeError) as err:
                    errors.append(err)
        raise RetargetError(f"no token count makes {node.format_node()} run: {errors[-1]}")

    def _substitute(self, node: fx.Node, env: dict, chosen: list[tuple[tuple, int]], prefix: str) -> Any:
        args, kwargs = node.args, dict(node.kwargs)
        for path, value in chosen:
            if path[0] == "a":
                args = _set(args, path[1:], self.sizes[value])
            else:
                kwargs = _set(kwargs, path[1:], self.sizes[value])
        out = self._apply(node, env, args, kwargs)
        if chosen:  # only committed once it ran
            node.args, node.kwargs = args, kwargs
            self.changes += [(prefix + node.name, path) for path, _ in chosen]
        return out


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graphs (also of nested GraphModules) may be mutated; tensors and node metadata are
    shared (``deepcopy`` would try to copy the fake tensors in the metadata)."""
    root = nn.Module()
    for name, child in gm.named_children():
        setattr(root, name, clone_graph_module(child) if isinstance(child, fx.GraphModule) else child)
    for name, buf in gm.named_buffers(recurse=False):
        root.register_buffer(name, buf)
    for name, param in gm.named_parameters(recurse=False):
        root.register_parameter(name, param)
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = fx.GraphModule(root, graph)
    new.meta = dict(gm.meta)
    return new


def retarget(
    stack: fx.GraphModule, args: Sequence[Any], sizes: dict[int, int]
) -> tuple[fx.GraphModule, list[Any], list[tuple[str, tuple]]]:
    """A copy of ``stack`` whose baked token counts follow ``sizes`` (old → new), for inputs ``args``
    already at the new size. Returns the copy, its outputs on ``args`` and the substituted positions."""
    new = clone_graph_module(stack)
    worker = _Retargeter(sizes)
    with torch.no_grad():
        try:
            outs = worker.run(new, args)
        except RetargetError:
            raise
        except Exception as err:  # an op that no substitution can fix
            raise RetargetError(str(err)) from err
    for gm in [new, *[m for m in new.modules() if isinstance(m, fx.GraphModule)]]:
        gm.recompile()
    return new, outs, worker.changes


def verify_by_tiling(
    run_full: Callable[[list[Any]], list[Any]],
    run_small: Callable[[list[Any]], list[Any]],
    full_args: list[Any],
    small_args: list[Any],
    stream_pos: int,
    token_inputs: dict[int, int],
    out_pos: int,
    repeats: int,
) -> float:
    """Relative error between a retargeted stack on k tokens and the original on those tokens tiled.

    Attention over a multiset of keys where every key appears ``repeats`` times gives the same
    weights as over the distinct keys, and everything else in a DiT block is per token; so the
    original stack on ``x`` tiled to N = repeats·k tokens must reproduce the retargeted stack on
    ``x`` at every copy. A substitution at a wrong position (e.g. a head dimension equal to N)
    breaks this equality.
    """
    tiled = list(full_args)
    tiled[stream_pos] = small_args[stream_pos].repeat(1, repeats, 1)
    for pos, dim in token_inputs.items():
        reps = [1] * small_args[pos].dim()
        reps[dim] = repeats
        tiled[pos] = small_args[pos].repeat(*reps)
    with torch.no_grad():
        big = run_full(tiled)[out_pos]
        small = run_small(small_args)[out_pos]
    k = small.shape[1]
    ref = big[:, :k]
    return float((ref - small).norm() / ref.norm().clamp_min(1e-12))
