"""Per-block state layout and the state-initialising block, shared by the cached and segment forms.

A block's flat state is ``(x̂ per stream, residuals newest first (H per output), the H steps they were
computed at)``; ``RecordingBlock`` always computes and emits that state (``insert_recording``). The
helpers below tell tracing from eager execution and fix the layouts ``cond`` branches need.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

# Active shadow recorders (see ``fastcache_compile.runtime.shadow_errors``).
_SHADOW: list[list[tuple[int, float]]] = []
# Active conformal-pair recorders (``fastcache_compile.drift``): (block, predicted error ê, true error)
# of every skip the eager forecast form makes.
_PAIRS: list[list[tuple[int, float, float]]] = []


# The previous generation's state tensors of the stream whose init call is running (eager only): the new
# state is written into them instead of into fresh tensors. A context variable, so threads serving other
# models never see each other's pool.
_RECYCLE: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar("fastcache_recycle", default=None)


@contextlib.contextmanager
def recycling(state: Sequence[torch.Tensor] | None) -> Iterator[None]:
    """While active, ``RecordingBlock`` (and the token stack's init) write the state they emit into the
    tensors of ``state``, a stream's previous-generation state that nothing reads any more. Dropping it
    and allocating anew costs the allocator new pages every generation: in eager on the CPU the freed
    state goes back to the OS and is faulted in again, and the process's peak grows by the state's size."""
    pool = [t for t in state or () if isinstance(t, torch.Tensor) and t.is_contiguous() and t.dim() > 0]
    token = _RECYCLE.set(pool)
    try:
        yield
    finally:
        _RECYCLE.reset(token)


def _recycled(like: torch.Tensor) -> torch.Tensor | None:
    """A pooled tensor of ``like``'s shape, dtype and device, taken out of the pool; None if there is none."""
    if _tracing((like,)):  # first: Dynamo (torch.export) cannot trace a ContextVar read
        return None
    pool = _RECYCLE.get()
    if not pool:
        return None
    for i, t in enumerate(pool):
        if _fits(t, like):
            return pool.pop(i)
    return None


def _fits(dst: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``like``'s value can be written into ``dst``: the same shape, dtype and device, contiguous,
    and writable here (state made under ``torch.inference_mode()`` may not be written outside it, as in
    a pipeline that mixes modes)."""
    same = dst.shape == like.shape and dst.dtype == like.dtype and dst.device == like.device
    return same and dst.is_contiguous() and (torch.is_inference_mode_enabled() or not dst.is_inference())


@contextlib.contextmanager
def collecting(registry: list[list]) -> Iterator[list]:
    """While active, the blocks append their records for ``registry`` (``_SHADOW``/``_PAIRS``) to the list."""
    records: list = []
    registry.append(records)
    try:
        yield records
    finally:
        registry.remove(records)


@dataclass(frozen=True)
class BlockLayout:
    """How one block's state is laid out in the flat state list."""

    index: int
    streams: tuple[int, ...]  # argument positions holding hidden states
    pairs: tuple[int | None, ...]  # per output: the stream argument it updates, or None
    history: int = 2  # computed residuals (and their steps) kept per output

    @property
    def num_state(self) -> int:
        return len(self.streams) + self.history * (len(self.pairs) + 1)

    def split(self, state: tuple | list) -> tuple[list, list[list], list]:
        """``(x_hat per stream, residuals[h][k] newest first, steps[h])`` of this block's flat state."""
        n_str, n_out, h = len(self.streams), len(self.pairs), self.history
        res = [list(state[n_str + m * n_out : n_str + (m + 1) * n_out]) for m in range(h)]
        return list(state[:n_str]), res, list(state[n_str + h * n_out : n_str + h * (n_out + 1)])


class _BlockBase(nn.Module):
    def __init__(self, block: fx.GraphModule, layout: BlockLayout) -> None:
        super().__init__()
        self.block = block
        self.layout = layout

    def _residuals(self, args: tuple, outs: tuple) -> list[torch.Tensor]:
        # Paired outputs are stored as residuals y − x (what the predictors extrapolate), unpaired
        # ones as plain values.
        return [o if p is None else _diff(o, args[p]) for o, p in zip(outs, self.layout.pairs)]


class RecordingBlock(_BlockBase):
    """Always computes; returns (outputs..., state..., computed)."""

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, step = flat[:-1], flat[-1]
        outs = tuple(self.block(*args))
        # The state is the cache's own (copies, contiguous so compiled variants see one fixed layout):
        # eager caching later writes the next step's state into these tensors (``_store``),
        # which must not be the graph's activations or outputs.
        res = [_own(r) if p is None else r for r, p in zip(self._residuals(args, outs), self.layout.pairs)]
        x_hat = [_own(args[p]) for p in self.layout.streams]
        s = step.float()
        h = self.layout.history
        # Older residuals start equal to r̂ (no trajectory yet) but must be their own tensors: cond
        # operands may not alias each other. Their steps −1, −2, … mark them as not computed: the
        # forecast form computes until its oldest step is real (≥ 0). Not s − 1, s − 2: a state that
        # starts mid-generation (a second graph, an evicted stream) would pass copies of r̂ off as a
        # computed history, and the fitted weights would extrapolate a trajectory that never happened.
        older = [_own(r) for _ in range(h - 1) for r in res]
        state = [*x_hat, *res, *older, s, *[torch.full_like(s, -float(m)) for m in range(1, h)]]
        return (*outs, *state, torch.ones((), dtype=torch.bool, device=step.device))


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that shares no storage with ``t`` (in a recycled tensor where one fits)."""
    dst = _recycled(t)
    return t.clone(memory_format=torch.contiguous_format) if dst is None else dst.copy_(t)


def _diff(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The residual ``y − x`` as a new tensor (a recycled one where one fits)."""
    dst = _recycled(y)
    x = x.to(y.dtype)
    return y - x if dst is None else torch.sub(y, x, out=dst)


def _store(dst: torch.Tensor, value: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """``value − base`` (or a copy of ``value``) written into ``dst`` when it has the right shape, dtype
    and layout; else a new tensor. Never returns a tensor that shares storage with ``value``/``base``."""
    if _fits(dst, value):
        if base is None:
            return dst.copy_(value)
        return torch.sub(value, base.to(value.dtype), out=dst)
    if base is None:
        return _own(value)
    return value - base.to(value.dtype)


def _rel_error(out: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """‖ŷ − y‖ / ‖y‖ in float32 (0-dim), as ``shadow_errors`` measures it."""
    return (out.float() - true.float()).norm() / true.float().norm().clamp_min(1e-12)


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


def state_history(form: str, params: dict[int, dict[str, torch.Tensor]] | None) -> int:
    """Residuals kept per block output: the forecaster's order K for ``forecast``, else 2."""
    if form != "forecast":
        return 2
    orders = {int(p["table"].shape[1]) for p in (params or {}).values() if "table" in p}
    if len(orders) != 1:
        raise ValueError(
            f"approximation='forecast' needs one forecaster order for all blocks in the calibration, got "
            f"{sorted(orders) or 'none'}; re-run fastcache_compile.calibrate(...) to fit the forecaster"
        )
    return orders.pop()


def _state_names(lay: BlockLayout) -> list[str]:
    i, n_out = lay.index, len(lay.pairs)
    # the first two residuals and steps keep their classic names (r̂, r̂′, s, s′): exporters read them
    res = ["r_hat", "r_prev", *[f"r_{m + 1}" for m in range(2, lay.history)]][: lay.history]
    stp = ["s", "s_prev", *[f"s_{m + 1}" for m in range(2, lay.history)]][: lay.history]
    names = [f"fc_{i}_x_hat_{j}" for j in range(len(lay.streams))]
    names += [f"fc_{i}_{r}_{k}" for r in res for k in range(n_out)]
    return names + [f"fc_{i}_{x}" for x in stp]
