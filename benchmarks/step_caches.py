"""FORA, First-Block-Cache and TeaCache as eager block wrappers over ``baselines.Baseline``.

What each does is described in ``benchmarks.baselines``; here are their implementations: every block's
``forward`` is replaced while the method is active, and state is kept per CFG stream (``call_key``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from benchmarks.baselines import Baseline, block_family, call_key, rel_l1


def _sub(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a - b


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a + b


@dataclass
class _Stream:
    step: int = -1
    block_res: dict[int, tuple] = field(default_factory=dict)  # FORA: per-block residuals, per stream
    head_res: torch.Tensor | None = None  # FBC: block 0's hidden residual at the last full step
    head_out: tuple | None = None  # FBC: block 0's outputs (all streams) at the last full step
    stack_in: tuple | None = None
    stack_res: tuple | None = None  # residual (per stream) of the blocks that a skip replaces
    prev_mod: torch.Tensor | None = None  # TeaCache: previous step's modulated input
    acc: float = 0.0
    skip: bool = False


class _BlockWrap(Baseline):
    """Replaces each block's ``forward`` with ``self._forward(i, run, states, kwargs)`` while active.

    ``states`` are the streams the block updates (``BlockFamily.states`` order, hidden states first);
    ``run(states)`` calls the real block on them and returns its new streams in the same order. The
    stream (CFG half) of a call is keyed at the *model* call, where the conditioning inputs are still
    the raw prompt / label tensors (inside the stack the prompt stream changes from block to block).
    """

    def __init__(self, model: torch.nn.Module, setting: str) -> None:
        super().__init__(model, setting)
        self.family = block_family(model)
        self.streams: dict[bytes, _Stream] = {}
        self.last = len(model.transformer_blocks) - 1
        self._key = b""
        self._pre: RemovableHandle | None = None

    def _apply(self) -> None:
        self._pre = self.model.register_forward_pre_hook(self._on_call, with_kwargs=True)
        for i, block in enumerate(self.model.transformer_blocks):
            block.forward = functools.partial(self._dispatch, i, block.forward)  # instance attr shadows the method

    def _remove(self) -> None:
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        for block in self.model.transformer_blocks:
            if "forward" in vars(block):
                del block.forward

    def reset(self) -> None:
        self.streams.clear()

    def _on_call(self, _: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._key = call_key(args, kwargs)

    def _stream(self) -> _Stream:
        return self.streams.setdefault(self._key, _Stream())

    def _dispatch(self, i: int, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        names = self.family.states
        if len(args) > len(names):
            raise ValueError(f"{self.family.name} got {len(args)} positional arguments; expected <= {len(names)}")
        kw = {**kwargs, **dict(zip(names, args))}  # states lead the signature of every family
        states = tuple(kw.get(n) for n in names)

        def run(new: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
            return self.family.unpack(original(**{**kw, **dict(zip(names, new))}))

        return self.family.pack(self._forward(i, run, states, kw))

    def _forward(self, i: int, run: _Run, states: _States, kw: dict[str, Any]) -> _States:
        raise NotImplementedError


_States = tuple[torch.Tensor | None, ...]
_Run = Callable[[_States], _States]


def _residual(out: _States, inp: _States) -> _States:
    return tuple(_sub(y, x) for y, x in zip(out, inp))


def _apply_residual(inp: _States, res: _States) -> _States:
    return tuple(_add(x, r) for x, r in zip(inp, res))


class Fora(_BlockWrap):
    """Compute every block every ``interval`` steps; in between y_l = x_l + r̂_l per block and stream."""

    method = "fora"

    def __init__(self, model: torch.nn.Module, interval: int) -> None:
        super().__init__(model, f"N={interval}")
        self.interval = interval

    def _forward(self, i: int, run: _Run, states: _States, kw: dict[str, Any]) -> _States:
        st = self._stream()
        if i == 0:
            st.step += 1
        if st.step % self.interval == 0 or i not in st.block_res:
            out = run(states)
            st.block_res[i] = _residual(out, states)  # type: ignore[assignment]
            return out
        return _apply_residual(states, st.block_res[i])  # type: ignore[arg-type]


class FirstBlockCache(_BlockWrap):
    """Block 0 always runs; a small change of its residual replaces blocks 1..L-1 by their residual."""

    method = "fbc"

    def __init__(self, model: torch.nn.Module, threshold: float) -> None:
        super().__init__(model, f"thr={threshold:g}")
        self.threshold = threshold

    def _forward(self, i: int, run: _Run, states: _States, kw: dict[str, Any]) -> _States:
        st = self._stream()
        if i == 0:
            out = run(states)
            res = out[0] - states[0]  # hidden-state residual of block 0, (B, N, D)
            # Compared with the last *computed* step (as ParaAttention and diffusers do), so drift over
            # consecutive skips accumulates into the test instead of escaping it.
            st.skip = st.head_res is not None and st.stack_res is not None and rel_l1(res, st.head_res) < self.threshold
            if st.skip:
                return _apply_residual(out, st.stack_res)  # type: ignore[arg-type]
            st.head_res, st.head_out = res, out  # type: ignore[assignment]
            return out
        if st.skip:
            return states  # block 0 already returned the whole stack's output
        out = run(states)
        if i == self.last:
            st.stack_res = _residual(out, st.head_out)  # type: ignore[assignment,arg-type]
        return out


class TeaCache(_BlockWrap):
    """Accumulated, polynomial-rescaled change of block 0's modulated input decides for the whole stack."""

    method = "teacache"

    def __init__(
        self,
        model: torch.nn.Module,
        threshold: float,
        coefficients: np.ndarray | list[float],
        num_steps: int,
        input_range: tuple[float, float] | list[float] | None = None,
    ) -> None:
        super().__init__(model, f"thr={threshold:g}")
        self.threshold = threshold
        self.poly = np.poly1d(coefficients)
        self.num_steps = num_steps
        self.input_range = input_range

    def rescale(self, change: float) -> float:
        # Deviation from TeaCache, which evaluates the polynomial anywhere: a degree-4 fit turns negative
        # just outside its data on this model (a large change would then *lower* the accumulator and
        # trigger skips), so the change is clipped to the fitted range and the result to >= 0.
        if self.input_range is not None:
            change = min(max(change, self.input_range[0]), self.input_range[1])
        return max(0.0, float(self.poly(change)))

    def _forward(self, i: int, run: _Run, states: _States, kw: dict[str, Any]) -> _States:
        st = self._stream()
        if i == 0:
            st.step += 1
            mod = self.family.modulate(self.model.transformer_blocks[0], states[0], kw)  # type: ignore[arg-type]
            # TeaCache always computes the first and last step and resets the accumulator when it computes.
            if st.prev_mod is None or st.stack_res is None or st.step == 0 or st.step >= self.num_steps - 1:
                st.skip, st.acc = False, 0.0
            else:
                st.acc += self.rescale(rel_l1(mod, st.prev_mod))
                st.skip = st.acc < self.threshold
                if not st.skip:
                    st.acc = 0.0
            st.prev_mod = mod
            if st.skip:
                return _apply_residual(states, st.stack_res)  # type: ignore[arg-type]
            st.stack_in = states  # type: ignore[assignment]
        if st.skip:
            return states
        out = run(states)
        if i == self.last:
            st.stack_res = _residual(out, st.stack_in)  # type: ignore[assignment,arg-type]
        return out


@torch.no_grad()
def fit_teacache(model: torch.nn.Module, run: Callable[[torch.nn.Module], Any], degree: int = 4) -> dict[str, Any]:
    """TeaCache's recipe on this model: over full generations driven by ``run(model)``, pair the relative
    L1 change of the modulated input with that of the model output between consecutive steps of the
    same stream, and fit ``np.polyfit(input_change, output_change, degree)``."""
    family = block_family(model)
    last: dict[bytes, tuple[float, torch.Tensor, torch.Tensor]] = {}  # stream -> (t, modulated, output)
    call: list[tuple[bytes, float]] = []
    mods: list[torch.Tensor] = []
    xs: list[float] = []
    ys: list[float] = []

    def on_call(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        call.append((call_key(args, kwargs), float(kwargs["timestep"].max())))

    def pre(block: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]  # (B, N, D): the block stack's input
        mods.append(family.modulate(block, x, kwargs))

    def post(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        (key, t), mod = call.pop(), mods.pop()
        out = output[0] if isinstance(output, tuple) else output.sample
        prev = last.get(key)
        if prev is not None and t < prev[0]:  # same generation (the timestep only decreases within one)
            xs.append(rel_l1(mod, prev[1]))
            ys.append(rel_l1(out, prev[2]))
        last[key] = (t, mod, out)

    handles = [
        model.register_forward_pre_hook(on_call, with_kwargs=True),
        model.transformer_blocks[0].register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    if len(xs) <= degree:
        raise ValueError(f"fit_teacache got {len(xs)} step pairs; run more steps or generations")
    coeffs = np.polyfit(np.asarray(xs), np.asarray(ys), degree)
    return {"coefficients": coeffs.tolist(), "pairs": len(xs), "input_change_range": [min(xs), max(xs)]}
