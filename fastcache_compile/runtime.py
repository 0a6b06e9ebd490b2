"""Runtime wrapper the backend returns: holds cache state between calls and picks the variant.

Per conditioning stream (slot) it keeps the functional state tensors the rewritten graph takes and
returns, the step counter of the current generation and the last timestep. Two compiled variants
exist per input signature: ``init`` (no state yet: compute everything, emit state) and ``cached``
(state in, ``torch.cond`` per block, state out).
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .config import FastCacheConfig
from .passes.outline_blocks import _is_state_input

# Placeholder names (Dynamo's ``l_<arg>_``) of the inputs that change every step by design: they
# never identify a conditioning stream. Everything else the user passes (class labels, text states,
# pooled embeddings, masks, ids) does.
_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "noise_level")
_LATENT_NAMES = ("hidden_states", "x", "sample", "latents", "latent_model_input", "img", "z", "x_t")

_RUNTIMES: weakref.WeakSet[CacheRuntime] = weakref.WeakSet()
_RECORDERS: list[Callable[..., None]] = []


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
    from .passes.insert_cache import _SHADOW

    errors: list[tuple[int, float]] = []
    _SHADOW.append(errors)
    try:
        yield errors
    finally:
        _SHADOW.remove(errors)


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


def _arg_name(placeholder: fx.Node) -> str:
    # ``l_timestep_``; decorated forwards (``*args, **kwargs`` wrappers) give ``l_kwargs_timestep_``
    name = placeholder.name.lower()
    for prefix in ("l_", "kwargs_", "args_"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.rstrip("_")


def _is_module_state(node: fx.Node, value: Any) -> bool:
    # The graph's own rule, plus the runtime value (a Parameter whose placeholder lacks metadata).
    return _is_state_input(node) or isinstance(value, torch.nn.Parameter)


def _fingerprint(t: torch.Tensor) -> bytes:
    # Exact bytes for small tensors (labels, pooled embeddings); for large ones a strided sample plus
    # two global sums, so different prompts never collide in practice.
    flat = t.detach().reshape(-1)
    if flat.numel() > 4096:
        idx = torch.linspace(0, flat.numel() - 1, 4096, device=flat.device).long()
        sample = flat[idx]
        sums = torch.stack([flat.double().sum(), (flat.double() ** 2).sum()])
        parts = [sample.cpu().numpy().tobytes(), sums.cpu().numpy().tobytes()]
    else:
        parts = [flat.cpu().numpy().tobytes()]
    return hashlib.sha1(b"".join(parts) + str((tuple(t.shape), t.dtype)).encode()).digest()


@dataclass
class _Slot:
    state: list[torch.Tensor] | None = None
    signature: tuple | None = None
    step: int = 0
    last_t: float | None = None


@dataclass
class _Stats:
    calls: int = 0
    generations: int = 0
    computed: torch.Tensor | None = None  # (num_blocks,) int64 running sum, on the model's device
    tokens_run: list[torch.Tensor] = field(default_factory=list)  # per call: tokens through the blocks
    token_counts: list[int] = field(default_factory=list)  # per call: N of that call's variant
    work: torch.Tensor | None = None  # running sum over calls of (blocks run × tokens run) / (blocks × N)


class CacheRuntime:
    """The callable the ``fastcache`` backend hands back to Dynamo for one graph."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        config: FastCacheConfig,
        build: Callable[[fx.GraphModule, Sequence[Any]], Variant],
        plain: Callable[[], Callable],
    ) -> None:
        self.gm = gm
        self.config = config
        self._build = build
        self._plain_factory = plain
        self._plain: Callable | None = None
        self.variants: dict[tuple, Variant] = {}
        self.slots: OrderedDict[bytes, _Slot] = OrderedDict()
        self.stats = _Stats()
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._param_ids = {id(v) for n, v in zip(placeholders, example_inputs) if _is_module_state(n, v)}
        names = [_arg_name(n) for n in placeholders]
        user = [
            i
            for i, (n, v) in enumerate(zip(placeholders, example_inputs))
            if isinstance(v, torch.Tensor) and not _is_module_state(n, v)
        ]
        self._timestep_pos = next((i for i in user if names[i] in _TIMESTEP_NAMES), None)
        latent = next((i for i in user if names[i] in _LATENT_NAMES), user[0] if user else None)
        self._cond_pos = [i for i in user if i not in (self._timestep_pos, latent)]
        _RUNTIMES.add(self)

    # -- bookkeeping -----------------------------------------------------------------------------
    def owns(self, module: torch.nn.Module) -> bool:
        ids = {id(p) for p in module.parameters()} | {id(b) for b in module.buffers()}
        return bool(ids & self._param_ids)

    @property
    def timestep_input(self) -> int | None:
        """Position of the graph input recognised as the timestep, if any."""
        return self._timestep_pos

    def reset(self) -> None:
        self.slots.clear()
        self.stats = _Stats()

    def _slot_for(self, args: Sequence[Any]) -> tuple[bytes, _Slot]:
        key = hashlib.sha1(b"".join(_fingerprint(args[i]) for i in self._cond_pos)).digest()
        slot = self.slots.get(key)
        if slot is None:
            if len(self.slots) >= self.config.max_streams:
                self.slots.popitem(last=False)  # least recently used stream loses its cache
            slot = self.slots[key] = _Slot()
        self.slots.move_to_end(key)
        return key, slot

    @staticmethod
    def _signature(args: Sequence[Any]) -> tuple:
        return tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else a for a in args)

    # -- call ------------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        if torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad and not isinstance(a, torch.nn.Parameter) for a in args
        ):
            # A cache has no gradient; differentiate through the plain graph instead.
            if self._plain is None:
                self._plain = self._plain_factory()
            return self._plain(*args)
        # Compiled variants are specialised to their example inputs' layouts; inputs such as an
        # expanded (stride-0) timestep would not match what the cond branches were traced with.
        args = tuple(
            a.contiguous() if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter) else a for a in args
        )
        with torch.no_grad():
            return self._call(list(args))

    def _call(self, args: list[Any]) -> Any:
        sig = self._signature(args)
        if sig not in self.variants:
            self.variants[sig] = self._build(self.gm, args)
        variant = self.variants[sig]
        n_out = variant.num_outputs
        recorder = _RECORDERS[-1] if _RECORDERS else None
        key, slot = self._slot_for(args)

        t_now = None
        if self._timestep_pos is not None:
            t_now = float(args[self._timestep_pos].detach().float().max())
        new_generation = slot.state is None or slot.signature != sig
        if t_now is not None and slot.last_t is not None and t_now > slot.last_t:
            new_generation = True  # the timestep jumped back up: a new sampling run started
        if new_generation:
            slot.state, slot.step = None, 0
            self.stats.generations += 1
        slot.last_t = t_now

        cfg = self.config
        step = torch.tensor(float(slot.step))
        if slot.state is None:
            outs = variant.init(*args, step)
        else:
            force = slot.step < cfg.warmup_steps or (cfg.num_steps is not None and slot.step >= cfg.num_steps - 1)
            force = force or recorder is not None  # calibration records full computations
            outs = variant.cached(*args, *slot.state, step, torch.tensor(force))
        outs = list(outs)
        if variant.num_tokens is not None:
            # (*outputs, *state, computed, tokens_run): the token count stays a tensor (no host sync)
            self.stats.tokens_run.append(outs.pop())
            self.stats.token_counts.append(variant.num_tokens)
        computed = outs[-1]
        # Compiled variants are specialised to the strides of their example inputs; Inductor may hand
        # back the state in another layout than the one it was first compiled with, so normalise it.
        slot.state = [s.contiguous() for s in outs[n_out:-1]]
        slot.signature = sig
        if recorder is not None:
            recorder(self, key, slot.step, slot.state, variant)
        slot.step += 1

        st = self.stats
        st.calls += 1
        flags = computed.to(torch.int64)
        st.computed = flags if st.computed is None else st.computed + flags
        work = computed.float().mean()
        if variant.num_tokens is not None:
            work = work * st.tokens_run[-1] / variant.num_tokens
        st.work = work if st.work is None else st.work + work
        return tuple(outs[:n_out]) if variant.seq_output else outs[0]

    def summary(self) -> dict[str, Any]:
        st = self.stats
        per_block = st.computed.tolist() if st.computed is not None else []
        n_blocks = len(per_block)
        return {
            "calls": st.calls,
            "generations": st.generations,
            "blocks_computed": int(sum(per_block)),
            "blocks_skipped": st.calls * n_blocks - int(sum(per_block)),
            "per_block_skipped": [st.calls - c for c in per_block],
            "compiled_variants": 2 * len(self.variants) + (self._plain is not None),
            "work_fraction": float(st.work) / st.calls if st.work is not None and st.calls else 1.0,
            **self._token_summary(),
        }

    def _token_summary(self) -> dict[str, Any]:
        st = self.stats
        if not st.tokens_run:
            return {}
        per_step = [int(t) for t in torch.stack(st.tokens_run).tolist()]
        return {
            "num_tokens": st.token_counts[-1],
            "tokens_per_call": per_step,
            # mean over calls of k/N, each call against its own variant's N (resolutions may differ)
            "token_fraction": sum(k / n for k, n in zip(per_step, st.token_counts)) / len(per_step),
        }


def runtimes_for(module: torch.nn.Module) -> list[CacheRuntime]:
    base = getattr(module, "_orig_mod", module)
    return [rt for rt in list(_RUNTIMES) if rt.owns(base)]
