"""Benchmark-only cache baselines for the eager reference models (not part of the library).

Every baseline is a context manager over the *uncompiled* transformer: ``with method: sample(method.model,
...)``; ``method.reset()`` between generations; ``method.flops_skipped()`` after the timed generations.

    none      no cache
    fora      FORA-style fixed interval: every N-th step computes all blocks, the others reuse each
              block's residual from that step, y_l = x_l + r̂_l (Selvaraju et al., 2024)
    fbc       First-Block-Cache: block 0 always runs; if the relative L1 change of its residual since the
              last full step is below the threshold, the rest of the stack is replaced by its cached
              residual (ParaAttention / diffusers ``FirstBlockCacheConfig``)
    teacache  TeaCache: relative L1 change of block 0's timestep-modulated input (adaLN-Zero: ``norm1``'s
              LayerNorm(x)·(1+scale)+shift), rescaled by a degree-4 polynomial fitted on this model,
              accumulated until it passes the threshold; a skipped step reuses the whole stack's
              residual (Liu et al., 2024). The polynomial comes from ``fit_teacache``.

Block families (``BlockFamily``): DiT's ``BasicTransformerBlock`` updates the hidden states only; the
MMDiT's ``JointTransformerBlock`` (SD3) updates the image and the prompt stream, and residual reuse
applies to both.

CFG streams: these caches key their state by the model call's conditioning (every tensor input but the
hidden states and the timestep: class labels, or prompt tokens and pooled embeddings, plus the batch
shape). With ``cfg="batch"`` the cond+uncond batch is one stream and
decides together (as FastCache does); with ``cfg="split"`` the cond and uncond calls of a step get
separate state, so one stream is never served from the other's cache.

Compute accounting: ``BlockCounter`` puts forward pre-hooks on every block's ``norm1`` and
self-attention ``to_q`` (``attn1`` / ``attn``) rather than on the blocks themselves, because cache hooks
(ours and diffusers') still *call* a skipped block and only short-circuit inside it; ``norm1`` runs
exactly when the block really computes. diffusers' own hooks are in ``benchmarks.diffusers_hooks``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class BlockFamily:
    """How one family of transformer blocks passes its streams in and out (data, not branches).

    ``states``: the block inputs that the block updates, hidden states first (both families name them
    first in ``forward``'s signature). ``returns``: the order of the returned streams, or None when the
    block returns the hidden states alone. ``attention``: the self-attention submodule's name.
    ``modulate(block, x, kwargs)``: the adaLN-modulated input LayerNorm(x)·(1 + scale) + shift (TeaCache).
    """

    name: str
    states: tuple[str, ...]
    returns: tuple[str, ...] | None
    attention: str
    modulate: Callable[[torch.nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor]

    def unpack(self, out: Any) -> tuple[torch.Tensor | None, ...]:
        """A block's return value as a tuple in ``states`` order (a missing stream is None)."""
        if self.returns is None:
            return (out,)
        named = dict(zip(self.returns, out))
        return tuple(named[n] for n in self.states)

    def pack(self, states: tuple[torch.Tensor | None, ...]) -> Any:
        """The inverse of ``unpack``: what the block itself would have returned."""
        if self.returns is None:
            return states[0]
        named = dict(zip(self.states, states))
        return tuple(named[n] for n in self.returns)


def _modulate_dit(block: torch.nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    # norm1.forward directly, so the block counter (a hook on norm1) does not count it.
    return block.norm1.forward(x, kw.get("timestep"), kw.get("class_labels"), hidden_dtype=x.dtype)[0]


def _modulate_sd3(block: torch.nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    return block.norm1.forward(x, emb=kw["temb"])[0]


DIT = BlockFamily("BasicTransformerBlock", ("hidden_states",), None, "attn1", _modulate_dit)
# SD3's JointTransformerBlock updates both streams and returns (encoder_hidden_states, hidden_states);
# the last block (context_pre_only) returns None for the prompt stream.
MMDIT = BlockFamily(
    "JointTransformerBlock",
    ("hidden_states", "encoder_hidden_states"),
    ("encoder_hidden_states", "hidden_states"),
    "attn",
    _modulate_sd3,
)
FAMILIES = {f.name: f for f in (DIT, MMDIT)}


def block_family(model: torch.nn.Module) -> BlockFamily:
    """The family of ``model.transformer_blocks``; ValueError naming the known ones otherwise."""
    name = type(model.transformer_blocks[0]).__name__
    if name not in FAMILIES:
        raise ValueError(f"no block family for {name}; add one to benchmarks.baselines.FAMILIES ({list(FAMILIES)})")
    return FAMILIES[name]


def stream_key(hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> bytes:
    """The conditioning stream of a *model* call: every tensor input except the hidden states and the
    timestep (class labels; prompt tokens and pooled embeddings), plus the batch shape."""
    parts = [repr(tuple(hidden_states.shape)).encode()]
    for name in sorted(kwargs):
        value = kwargs[name]
        if name not in ("hidden_states", "timestep") and isinstance(value, torch.Tensor):
            parts.append(name.encode() + value.detach().cpu().contiguous().numpy().tobytes())
    return b"|".join(parts)


def call_key(args: tuple, kwargs: dict[str, Any]) -> bytes:
    """``stream_key`` of a model call from its forward pre-hook arguments."""
    return stream_key(kwargs.get("hidden_states", args[0] if args else None), kwargs)


def _sub(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a - b


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a + b


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a − b| / mean|b|, the change measure of FBC and TeaCache."""
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


class BlockCounter:
    """Counts model calls and the block / self-attention executions that really ran."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.num_blocks = len(model.transformer_blocks)
        self.attention = block_family(model).attention
        self.calls = self.blocks = self.attentions = 0
        self._handles: list[RemovableHandle] = []

    def _bump(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            setattr(self, name, getattr(self, name) + 1)

        return hook

    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._bump("calls")))
        for block in self.model.transformer_blocks:
            self._handles.append(block.norm1.register_forward_pre_hook(self._bump("blocks")))
            to_q = getattr(block, self.attention).to_q
            self._handles.append(to_q.register_forward_pre_hook(self._bump("attentions")))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.calls = self.blocks = self.attentions = 0

    def block_skip_fraction(self) -> float:
        slots = self.calls * self.num_blocks
        return 1.0 - self.blocks / slots if slots else 0.0

    def attention_skip_fraction(self) -> float:
        slots = self.calls * self.num_blocks
        return 1.0 - self.attentions / slots if slots else 0.0


class Baseline:
    """No cache. Subclasses change ``_apply`` / ``_remove`` / ``reset`` only."""

    method = "none"
    granularity = "block"  # what a skip removes: whole blocks, or only self-attention ("attention")

    def __init__(self, model: torch.nn.Module, setting: str = "-") -> None:
        self.model = model
        self.setting = setting
        self.counter = BlockCounter(model)
        self.notes = ""

    def __enter__(self) -> Baseline:
        self.counter.attach()
        try:
            self._apply()
        except BaseException:
            self._remove()
            self.counter.detach()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()
        self.counter.detach()

    def _apply(self) -> None:
        pass

    def _remove(self) -> None:
        pass

    def reset(self) -> None:
        """Forget all cache state: the next call starts a new generation."""

    def clear_stats(self) -> None:
        """Start counting afresh (after the warm-up generation)."""
        self.reset()
        self.counter.clear()

    def flops_skipped(self, attention_fraction_of_block: float) -> float:
        """Fraction of block-stack compute skipped. Attention-only caches skip a part of each block,
        weighted by the measured attention share of a block."""
        if self.granularity == "attention":
            return self.counter.attention_skip_fraction() * attention_fraction_of_block
        return self.counter.block_skip_fraction()


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
