"""Runtime wrapper the backend returns: picks the compiled variant and carries cache state between calls.

Dynamo hands one ``CacheRuntime`` per graph; the state it carries belongs to the model instance the
call is for (``instances.Owner``: per conditioning stream the functional state tensors the rewritten
graph takes and returns, statistics, and the generation's ``Schedule``). Two compiled variants exist
per input signature: ``init`` (no state yet: compute everything, emit state) and ``cached`` (state
in, ``torch.cond`` per block, state out).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .config import FastCacheConfig
from .instances import _OWNERS, Owner, Part, Slot, config_tag, owner_for, owners_of, summarize
from .passes.block_state import recycling
from .roles import Roles, _is_module_state  # noqa: F401  (_is_module_state: the ONNX export's rule too)

_NO_TIMESTEP = (
    "fastcache: no timestep input recognised (by name, or as a per-sample float input that changes "
    "between calls of one stream); call fastcache_compile.reset(model) before each new generation"
)

_RUNTIMES: weakref.WeakSet[CacheRuntime] = weakref.WeakSet()
_RECORDERS: list[Callable[..., None]] = []
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


@contextlib.contextmanager
def recording(recorder: Callable[..., None]) -> Iterator[None]:
    """While active, every runtime forces full computation and reports its state to ``recorder``."""
    _RECORDERS.append(recorder)
    try:
        yield
    finally:
        _RECORDERS.remove(recorder)


@contextlib.contextmanager
def shadow_errors() -> Iterator[list[tuple[int, float]]]:
    """Benchmark-only: with ``lowering="eager"``, every skipped block is also computed and the true
    relative output error ``‖ŷ − y‖/‖y‖`` of the prediction is appended as ``(block, error)``."""
    from .passes.block_state import _SHADOW, collecting

    with collecting(_SHADOW) as errors:
        yield errors


@dataclass
class Variant:
    """The compiled graphs for one input signature."""

    init: Callable
    cached: Callable
    num_outputs: int
    seq_output: bool
    layouts: list[Any]
    fingerprint: dict[str, Any] | None = None
    num_tokens: int | None = None  # token selection on: the block stack's token count N
    audit: bool = False  # the cached graph also returns each skipped block's true relative error


class CacheRuntime:
    """The callable the ``fastcache`` backend hands back to Dynamo for one graph."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        config: FastCacheConfig,
        build: Callable[[fx.GraphModule, Sequence[Any]], Variant],
        plain: Callable[[Sequence[Any]], Callable],
        admit: Callable[[fx.GraphModule, Sequence[Any]], None] | None = None,
    ) -> None:
        self.gm = gm
        # checks a model instance on its first call here (``build`` checks only the first instance per
        # input signature): another instance served by this graph may not fit the calibration
        self._admit = admit
        self.config = config
        self._build = build
        self._plain_factory = plain
        self._plain: Callable | None = None
        self.variants: dict[tuple, Variant] = {}
        self._tag = config_tag(config)
        self.roles = Roles([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)
        self._anon = Owner(config, None) if self.roles.owner is None else None
        self._last: weakref.ref[Owner] | None = None
        _RUNTIMES.add(self)

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def timestep_input(self) -> int | None:
        """Position of the graph input recognised as the timestep, if any (yet)."""
        return self.roles.timestep

    @property
    def _timestep_pos(self) -> int | None:  # the exported runner reads the roles under these names
        return self.roles.timestep

    @property
    def _cond_pos(self) -> list[int]:
        return self.roles.cond

    @property
    def compiled_variants(self) -> int:
        return 2 * len(self.variants) + (self._plain is not None)

    def owns(self, module: torch.nn.Module) -> bool:
        """For a graph without module-state inputs: whether it holds ``module``'s parameters itself."""
        ids = {id(p) for p in module.parameters()} | {id(b) for b in module.buffers()}
        return any(id(p) in ids for p in self.gm.parameters()) or any(id(b) in ids for b in self.gm.buffers())

    def _owners(self) -> list[Owner]:
        if self._anon is not None:
            return [self._anon]
        return [o for o in list(_OWNERS.values()) if self in o.parts]

    def reset(self) -> None:
        """Forget the state and statistics of every instance this graph served."""
        for owner in self._owners():
            owner.reset()

    def summary(self) -> dict[str, Any]:
        """Statistics of every instance this graph served (the exported runner has exactly one)."""
        owners = self._owners()
        parts = [(self, o.parts[self]) for o in owners if self in o.parts]
        return summarize(parts, sum(o.schedule.generations for o in owners))

    def _owner(self, args: Sequence[Any]) -> Owner:
        if self._anon is not None:
            return self._anon
        param = args[self.roles.owner]
        last = self._last() if self._last is not None else None
        if last is not None and last.ref is not None and last.ref() is param and last.thread == threading.get_ident():
            return last
        owner = owner_for(param, self._tag, self.config)
        self._last = weakref.ref(owner)  # never keeps a dead model's state alive
        return owner

    def _slot(self, part: Part, key: bytes, generation: int) -> Slot:
        slot = part.slots.get(key)
        if slot is not None:
            part.slots.move_to_end(key)
            return slot
        if len(part.slots) >= self.config.max_streams:
            _, evicted = part.slots.popitem(last=False)  # least recently used stream loses its cache
            if evicted.state is not None and evicted.generation == generation and not self.roles.searching:
                _warn_once(
                    f"fastcache: more conditioning streams than max_streams={self.config.max_streams} run in "
                    "one generation, so each call evicts another stream's cache and computes every block; "
                    "raise options['max_streams'] to the number of calls per step (cond, uncond, ...)"
                )
        slot = part.slots[key] = Slot()
        return slot

    def _search(self, args: Sequence[Any], owner: Owner) -> None:
        outcome, before = self.roles.search(args)
        if outcome == "none":
            _warn_once(_NO_TIMESTEP)
        elif outcome == "found":
            for o in self._owners():
                o.part(self).slots.clear()  # their keys held the timestep: no stream matches them again
            if owner.schedule.last_t is None:
                owner.schedule.last_t = before  # so this call is the generation's second step

    # -- call ------------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # A cache has no gradient (a model in training, un-frozen parameters, inputs that require
            # grad): differentiate through the plain graph instead.
            if self._plain is None:
                self._plain = self._plain_factory(args)
            return self._plain(*args)
        # Compiled variants are specialised to their example inputs' layouts; inputs such as an
        # expanded (stride-0) timestep would not match what the cond branches were traced with.
        call = list(args)
        for i in self.roles.user:
            call[i] = call[i].contiguous()
        with torch.no_grad():
            return self._call(call)

    def _call(self, args: list[Any]) -> Any:
        sig = tuple(
            (tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a
            for a in (args[i] for i in self.roles.signature)
        )
        variant = self.variants.get(sig)
        if variant is None:
            variant = self.variants[sig] = self._build(self.gm, args)
        n_out = variant.num_outputs
        recorder = _RECORDERS[-1] if _RECORDERS else None
        owner = self._owner(args)
        if self._admit is not None and self not in owner.parts:
            self._admit(self.gm, args)  # raises before the instance gets any state here
        part = owner.part(self)

        if self.roles.searching:
            self._search(args, owner)
        roles = self.roles
        t_now = None if roles.timestep is None else float(args[roles.timestep].detach().float().max())
        key, stream = roles.keys(args)
        generation, step = owner.schedule.observe(stream, t_now)
        slot = self._slot(part, key, generation)
        recycle = None
        if slot.generation != generation or slot.signature != sig:
            # another generation's state, or another input signature's; nothing reads the former again,
            # so the new generation's first call writes its state into those tensors (eager lowering)
            recycle = slot.state if slot.signature == sig else None
            slot.state = None

        cfg = self.config
        step_t = torch.tensor(float(step))
        if slot.state is None:
            with recycling(recycle):
                outs = variant.init(*args, step_t)
            del recycle
        else:
            force = step < cfg.warmup_steps or (cfg.num_steps is not None and step >= cfg.num_steps - 1)
            force = force or (cfg.refresh_every is not None and step % cfg.refresh_every == 0)
            force = force or (cfg.refresh_steps is not None and step in cfg.refresh_steps)
            force = force or recorder is not None  # calibration records full computations
            try:
                outs = variant.cached(*args, *slot.state, step_t, torch.tensor(force))
            except BaseException:
                # Eager caching updates a slot's state tensors in place, block by block: after a failed
                # call they mix two steps, so the stream starts over instead of reading them.
                slot.state = None
                raise
        outs = list(outs)
        # audit: (..., computed, audit_errors) from the cached graph; the init graph computes everything
        audit_err = outs.pop() if variant.audit and slot.state is not None else None
        # token mode: (*outputs, *state, computed, tokens_run); the count stays a tensor (no host sync)
        tokens_run = outs.pop() if variant.num_tokens is not None else None
        computed = outs[-1]
        # Compiled variants are specialised to the strides of their example inputs; Inductor may hand
        # back the state in another layout than the one it was first compiled with, so normalise it.
        slot.state = [s.contiguous() for s in outs[n_out:-1]]
        slot.signature, slot.generation = sig, generation
        if recorder is not None:
            recorder(part, key, step, slot.state, variant)
        part.stats.add(computed, tokens_run, variant.num_tokens)
        if audit_err is not None:
            part.stats.add_audit(computed, audit_err, cfg.threshold)
        return tuple(outs[:n_out]) if variant.seq_output else outs[0]


def owners_of_model(module: torch.nn.Module) -> list[Owner]:
    """Every live owner (model instance × compile) of ``module`` that has run at least once."""
    base = getattr(module, "_orig_mod", module)
    owners = owners_of(base)
    owners += [rt._anon for rt in list(_RUNTIMES) if rt._anon is not None and rt.owns(base)]
    return [o for o in owners if len(o.parts)]
