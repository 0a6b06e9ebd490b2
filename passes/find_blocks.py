"""Find the repeated transformer blocks of a flat Dynamo graph.

Analysis pass: the graph is unchanged; every node that belongs to block ``i`` (in execution order)
gets ``node.meta["fastcache_block"] = i`` and the plan is stored in ``gm.meta["fastcache_plan"]``.

Blocks come from ``node.meta["nn_module_stack"]``: a stack entry whose path has an integer component
(``...transformer_blocks.3``) names a member of a module list. A list counts as a block stack when it
has at least two members of one class that each hold real compute. Where that metadata is missing
(graphs built by hand or by other tracers), the parameters a node reads give the fallback: Dynamo
names lifted parameters after their module path (``..._blocks_modules_3_..._weight_``), so nodes are
assigned to the member whose parameters they consume. A graph with neither is refused; the backend
then warns once and compiles it plainly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx

_NOISE_TOKENS = {"L", "self", "__dict__", "_modules", "getattr"}
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_MIN_NODES_PER_BLOCK = 5


class BlockPlanError(RuntimeError):
    """The graph has no block stack this backend can cache."""


@dataclass
class BlockInfo:
    index: int  # position in execution order over all stacks
    stack: str  # container path, e.g. "transformer_blocks"
    layer: int  # index inside the container
    family: str  # class name of the block module
    nodes: list[fx.Node] = field(default_factory=list)


@dataclass
class BlockPlan:
    blocks: list[BlockInfo]

    @property
    def stacks(self) -> list[str]:
        return sorted({b.stack for b in self.blocks}, key=[b.stack for b in self.blocks].index)


def _module_path(entry: str) -> list[str]:
    return [tok for tok in _TOKEN.findall(entry) if tok not in _NOISE_TOKENS]


def _type_name(t: object) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).rsplit(".", 1)[-1].strip("'>")


def _block_of(node: fx.Node) -> tuple[str, int, str] | None:
    """(container path, index, family) of the outermost module-list member on the node's stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, mod_type in stack.values():
        tokens = _module_path(path)
        for i, tok in enumerate(tokens):
            if tok.isdigit() and i > 0:
                if i == len(tokens) - 1:
                    return ".".join(tokens[:i]), int(tok), _type_name(mod_type)
                break  # a deeper entry of the same member comes next and names its class
    return None


_PARAM_NAME = re.compile(r"^l_self_(?:dict_)?modules_(.+?)_modules_(\d+)_")


def _by_module_stack(gm: fx.GraphModule) -> tuple[dict[tuple[str, int], list[fx.Node]], dict[tuple[str, int], str]]:
    members: dict[tuple[str, int], list[fx.Node]] = defaultdict(list)
    family: dict[tuple[str, int], str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        found = _block_of(node)
        if found is None:
            continue
        stack, layer, fam = found
        members[(stack, layer)].append(node)
        family.setdefault((stack, layer), fam)
    return members, family


def _by_parameter_names(
    gm: fx.GraphModule,
) -> tuple[dict[tuple[str, int], list[fx.Node]], dict[tuple[str, int], str]]:
    """Structural fallback: a block is the span of nodes from the first to the last reader of its
    lifted parameters (graph order is execution order, and blocks run one after another)."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    span: dict[tuple[str, int], list[int]] = {}
    for node in nodes:
        if node.op != "placeholder":
            continue
        match = _PARAM_NAME.match(node.name.lower())
        if match is None:
            continue
        key = (match.group(1), int(match.group(2)))
        for user in node.users:
            lo, hi = span.get(key, [len(nodes), -1])
            span[key] = [min(lo, position[user]), max(hi, position[user])]
    members: dict[tuple[str, int], list[fx.Node]] = defaultdict(list)
    for key, (lo, hi) in span.items():
        members[key] = [n for n in nodes[lo : hi + 1] if n.op in ("call_function", "call_method", "call_module")]
    return members, {key: key[0] for key in members}


_HOOK_FRAME = re.compile(r'File "[^"]*[/\\]diffusers[/\\]hooks[/\\][^"]*"')


def _hook_frame(node: fx.Node) -> bool:
    """Whether the node's innermost source frame is diffusers hook code (not the block's own)."""
    frames = [line for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip().startswith("File")]
    return bool(frames) and _HOOK_FRAME.search(frames[-1]) is not None


def _without_hook_prologue(nodes: list[fx.Node]) -> list[fx.Node]:
    """Drop the leading nodes a diffusers ``pre_forward`` hook adds to a block (context parallelism
    shards ``blocks.0``'s input there): they carry the member's module stack, but inside the block
    they would make its cached stream the unsharded input, which no output pairs with."""
    members, prologue = set(nodes), set()
    for node in nodes:
        inputs = [a for a in node.all_input_nodes if a in members]
        if not _hook_frame(node) or any(a not in prologue for a in inputs):
            break
        prologue.add(node)
    return [n for n in nodes if n not in prologue]


def find_blocks(gm: fx.GraphModule) -> fx.GraphModule:
    members, family = _by_module_stack(gm)
    if not members:
        members, family = _by_parameter_names(gm)
    members = {key: _without_hook_prologue(nodes) for key, nodes in members.items()}

    by_stack: dict[str, list[int]] = defaultdict(list)
    for stack, layer in members:
        by_stack[stack].append(layer)
    kept: list[tuple[str, int]] = []
    for stack, layers in by_stack.items():
        families = {family[(stack, layer)] for layer in layers}
        big = all(len(members[(stack, layer)]) >= _MIN_NODES_PER_BLOCK for layer in layers)
        if len(layers) >= 2 and len(families) == 1 and big:
            kept.extend((stack, layer) for layer in layers)
    if not kept:
        raise BlockPlanError("no repeated transformer blocks found (a module list with >= 2 blocks of one class)")

    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    kept.sort(key=lambda key: position[members[key][0]])
    blocks = [
        BlockInfo(index=i, stack=stack, layer=layer, family=family[(stack, layer)], nodes=members[(stack, layer)])
        for i, (stack, layer) in enumerate(kept)
    ]
    for block in blocks:
        for node in block.nodes:
            node.meta["fastcache_block"] = block.index
    gm.meta["fastcache_plan"] = BlockPlan(blocks)
    return gm
