"""Cache state per model instance: whose call it is, its stream slots, its statistics.

Dynamo serves every instance of a class compiled with equal options from one graph, and so from
one ``CacheRuntime`` (parameters are graph inputs under ``inline_inbuilt_nn_modules``). The state
therefore belongs to an ``Owner``, one per model instance and compile, identified by the first
parameter tensor the call carries and held only through a weak reference: when the model dies
its owner and every cache tensor of it go too, and a new object at a reused id is never matched.
Compiles of one module with different options have different owners (told apart by their config);
compiles with equal options share Dynamo's graphs and so one owner. Each thread that calls a model
gets an owner of its own: concurrent generations on one model (a pipeline per thread sharing one
transformer) would otherwise interleave in one schedule and, with equal prompts, read one stream's cache.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import FastCacheConfig
from .schedule import Schedule

_CONFIG_TAGS: dict[FastCacheConfig, int] = {}
# (id of the owning parameter, config tag, calling thread) -> owner
_OWNERS: dict[tuple[int, int, int], Owner] = {}


def config_tag(config: FastCacheConfig) -> int:
    """A small int per distinct config, so per-call lookups never hash the dataclass."""
    return _CONFIG_TAGS.setdefault(config, len(_CONFIG_TAGS))


@dataclass
class Slot:
    """One conditioning stream's functional state in one graph."""

    state: list[torch.Tensor] | None = None
    signature: tuple | None = None
    generation: int = 0  # the generation ``state`` was computed in; older state is never reused


@dataclass
class Stats:
    """Running sums only: constant size however many calls (tensors stay on the model's device)."""

    calls: int = 0
    computed: torch.Tensor | None = None  # (num_blocks,) int64: calls that computed each block
    work: torch.Tensor | None = None  # Σ over calls of (blocks run × tokens run) / (blocks × N)
    token_fraction: torch.Tensor | None = None  # Σ over token-mode calls of k / N
    token_calls: int = 0
    token_hist: dict[int, torch.Tensor] = field(default_factory=dict)  # N -> (N+1,) calls per k
    num_tokens: int | None = None  # N of the last token-mode call
    audit: tuple[torch.Tensor, ...] | None = None  # (skips, violations, max error, error sum), running

    def add_audit(self, computed: torch.Tensor, err: torch.Tensor, tau: float) -> None:
        skipped = ~computed.bool()  # (num_blocks,)
        e = torch.where(skipped, err.float(), torch.zeros_like(err, dtype=torch.float32))
        vals = (skipped.sum(), ((e > tau) & skipped).sum(), e.amax(), e.sum())
        if self.audit is None:
            self.audit = vals
        else:
            a = self.audit
            self.audit = (a[0] + vals[0], a[1] + vals[1], torch.maximum(a[2], vals[2]), a[3] + vals[3])

    def add(self, computed: torch.Tensor, tokens_run: torch.Tensor | None, num_tokens: int | None) -> None:
        self.calls += 1
        flags = computed.to(torch.int64)
        self.computed = flags if self.computed is None else self.computed + flags
        work = computed.float().mean()
        if tokens_run is not None and num_tokens is not None:
            frac = tokens_run.float() / num_tokens
            work = work * frac
            self.token_fraction = frac if self.token_fraction is None else self.token_fraction + frac
            self.token_calls += 1
            self.num_tokens = num_tokens
            hist = self.token_hist.get(num_tokens)
            if hist is None:
                hist = self.token_hist[num_tokens] = torch.zeros(num_tokens + 1, dtype=torch.int64, device=flags.device)
            hist.index_add_(0, tokens_run.reshape(1).long(), torch.ones(1, dtype=torch.int64, device=flags.device))
        self.work = work if self.work is None else self.work + work


@dataclass
class Part:
    """An owner's state in one graph (runtime): its stream slots and statistics."""

    slots: OrderedDict[bytes, Slot] = field(default_factory=OrderedDict)
    stats: Stats = field(default_factory=Stats)


class Owner:
    """One model instance under one compile: its schedule (shared by its graphs) and its parts."""

    def __init__(self, config: FastCacheConfig, ref: weakref.ref | None, thread: int | None = None) -> None:
        self.config = config
        self.ref = ref  # the owning parameter; None for a graph without module state
        self.thread = thread  # the calling thread's ident (``threading.get_ident``); None: any
        self.schedule = Schedule(num_steps=config.num_steps)
        self.parts: weakref.WeakKeyDictionary[Any, Part] = weakref.WeakKeyDictionary()  # runtime -> part

    def part(self, runtime: Any) -> Part:
        part = self.parts.get(runtime)
        if part is None:
            part = self.parts[runtime] = Part()
        return part

    def reset(self) -> None:
        self.schedule.reset()
        for part in self.parts.values():
            part.slots.clear()
            part.stats = Stats()


def owner_for(param: torch.Tensor, tag: int, config: FastCacheConfig) -> Owner:
    thread = threading.get_ident()
    key = (id(param), tag, thread)
    owner = _OWNERS.get(key)
    # An owner whose graphs are all gone (``torch._dynamo.reset()``) is stale: a new compile starts
    # clean rather than continuing its generation count.
    if owner is None or owner.ref is None or owner.ref() is not param or not len(owner.parts):
        # The callback drops the owner (and its cache tensors) as soon as the parameter dies; it runs
        # before the id can be reused, so a later object at the same address starts clean.
        ref = weakref.ref(param, lambda _, k=key: _OWNERS.pop(k, None))
        owner = _OWNERS[key] = Owner(config, ref, thread)
    return owner


def owners_of(module: torch.nn.Module) -> list[Owner]:
    """Owners whose parameter belongs to ``module`` (any compile)."""
    ids = {id(p) for p in module.parameters()} | {id(b) for b in module.buffers()}
    return [o for (pid, _, _), o in list(_OWNERS.items()) if pid in ids and o.ref is not None and o.ref() is not None]


def summarize(parts: list[tuple[Any, Part]], generations: int) -> dict[str, Any]:
    """The keys of ``fastcache_compile.stats`` for these parts (one owner, or one runtime's)."""
    calls = sum(p.stats.calls for _, p in parts)
    per_block: list[int] = []
    work = 0.0
    for _, p in parts:
        if p.stats.computed is not None:
            cur = p.stats.computed.tolist()
            per_block = [a + b for a, b in zip(per_block, cur)] if per_block else cur
        if p.stats.work is not None:
            work += float(p.stats.work)
    computed = int(sum(per_block))
    skipped = calls * len(per_block) - computed
    out: dict[str, Any] = {
        "graphs": len(parts),
        "calls": calls,
        "generations": generations,
        "blocks_computed": computed,
        "blocks_skipped": skipped,
        "per_block_skipped": [calls - c for c in per_block],
        "compiled_variants": sum(rt.compiled_variants for rt in {id(rt): rt for rt, _ in parts}.values()),
        # share of the block stack's token-blocks that ran: block skips and token selection together
        "work_fraction": work / calls if calls else 1.0,
        "skip_ratio": skipped / (calls * len(per_block)) if calls and per_block else 0.0,
        # cache tensors held now, all streams and graphs: what caching adds to the model's memory
        "state_bytes": sum(
            t.numel() * t.element_size() for _, p in parts for sl in p.slots.values() for t in (sl.state or ())
        ),
    }
    audits = [p.stats.audit for _, p in parts if p.stats.audit is not None]
    if audits:
        n = sum(int(a[0]) for a in audits)
        out["audit"] = {
            "skips": n,
            "violations": sum(int(a[1]) for a in audits),  # relative output error > τ
            "max_error": max(float(a[2]) for a in audits),
            "mean_error": sum(float(a[3]) for a in audits) / max(n, 1),
        }
    token_calls = sum(p.stats.token_calls for _, p in parts)
    if token_calls:
        hist: dict[int, int] = {}
        for _, p in parts:
            for h in p.stats.token_hist.values():
                for k in torch.nonzero(h).flatten().tolist():
                    hist[k] = hist.get(k, 0) + int(h[k])
        last = next(p.stats.num_tokens for _, p in reversed(parts) if p.stats.num_tokens is not None)
        frac = sum(float(p.stats.token_fraction) for _, p in parts if p.stats.token_fraction is not None)
        out.update(
            num_tokens=last,
            tokens_per_call=dict(sorted(hist.items())),  # tokens run through the blocks -> number of calls
            token_fraction=frac / token_calls,  # mean over calls of k/N, each against its own variant's N
        )
    return out
