"""Benchmark-only cache baselines for the eager reference DiT (not part of the library).

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

CFG streams: these caches key their state by the block's conditioning (the ``class_labels`` tensor the
block receives, plus the batch shape). With ``cfg="batch"`` the cond+uncond batch is one stream and
decides together (as FastCache does); with ``cfg="split"`` the cond and uncond calls of a step get
separate state, so one stream is never served from the other's cache.

Compute accounting: ``BlockCounter`` puts forward pre-hooks on every block's ``norm1`` and
``attn1.to_q`` rather than on the blocks themselves, because cache hooks (ours and diffusers') still
*call* a skipped block and only short-circuit inside it; ``norm1`` runs exactly when the block really
computes. diffusers' own hooks are in ``benchmarks.diffusers_hooks``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle


def stream_key(hidden_states: torch.Tensor, class_labels: torch.Tensor | None) -> bytes:
    """The conditioning stream a call belongs to: its labels (cond vs. null class) and batch shape."""
    labels = b"" if class_labels is None else class_labels.detach().cpu().numpy().tobytes()
    return labels + repr(tuple(hidden_states.shape)).encode()


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a − b| / mean|b|, the change measure of FBC and TeaCache."""
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


class BlockCounter:
    """Counts model calls and the block / self-attention executions that really ran."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.num_blocks = len(model.transformer_blocks)
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
            self._handles.append(block.attn1.to_q.register_forward_pre_hook(self._bump("attentions")))

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
    block_res: dict[int, torch.Tensor] = field(default_factory=dict)  # FORA: per-block residuals
    head_res: torch.Tensor | None = None  # FBC: block 0's residual at the last full step
    head_out: torch.Tensor | None = None
    stack_in: torch.Tensor | None = None
    stack_res: torch.Tensor | None = None  # residual of the blocks that a skip replaces
    prev_mod: torch.Tensor | None = None  # TeaCache: previous step's modulated input
    acc: float = 0.0
    skip: bool = False


class _BlockWrap(Baseline):
    """Replaces each block's ``forward`` with ``self._forward(i, original, ...)`` while active."""

    def __init__(self, model: torch.nn.Module, setting: str) -> None:
        super().__init__(model, setting)
        self.streams: dict[bytes, _Stream] = {}
        self.last = len(model.transformer_blocks) - 1

    def _apply(self) -> None:
        for i, block in enumerate(self.model.transformer_blocks):
            block.forward = functools.partial(self._forward, i, block.forward)  # instance attr shadows the method

    def _remove(self) -> None:
        for block in self.model.transformer_blocks:
            if "forward" in vars(block):
                del block.forward

    def reset(self) -> None:
        self.streams.clear()

    def _stream(self, x: torch.Tensor, kwargs: dict[str, Any]) -> _Stream:
        return self.streams.setdefault(stream_key(x, kwargs.get("class_labels")), _Stream())

    def _forward(self, i: int, run: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class Fora(_BlockWrap):
    """Compute every block every ``interval`` steps; in between y_l = x_l + r̂_l per block."""

    method = "fora"

    def __init__(self, model: torch.nn.Module, interval: int) -> None:
        super().__init__(model, f"N={interval}")
        self.interval = interval

    def _forward(self, i: int, run: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        st = self._stream(x, kwargs)
        if i == 0:
            st.step += 1
        if st.step % self.interval == 0 or i not in st.block_res:
            y = run(x, *args, **kwargs)  # (B, N, D)
            st.block_res[i] = y - x
            return y
        return x + st.block_res[i]


class FirstBlockCache(_BlockWrap):
    """Block 0 always runs; a small change of its residual replaces blocks 1..L-1 by their residual."""

    method = "fbc"

    def __init__(self, model: torch.nn.Module, threshold: float) -> None:
        super().__init__(model, f"thr={threshold:g}")
        self.threshold = threshold

    def _forward(self, i: int, run: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        st = self._stream(x, kwargs)
        if i == 0:
            y = run(x, *args, **kwargs)
            res = y - x
            # Compared with the last *computed* step (as ParaAttention and diffusers do), so drift over
            # consecutive skips accumulates into the test instead of escaping it.
            st.skip = st.head_res is not None and st.stack_res is not None and rel_l1(res, st.head_res) < self.threshold
            if st.skip:
                return y + st.stack_res
            st.head_res, st.head_out = res, y
            return y
        if st.skip:
            return x  # block 0 already returned the whole stack's output
        y = run(x, *args, **kwargs)
        if i == self.last:
            assert st.head_out is not None
            st.stack_res = y - st.head_out
        return y


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

    def _forward(self, i: int, run: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        st = self._stream(x, kwargs)
        if i == 0:
            st.step += 1
            mod = modulated_input(self.model, x, kwargs)
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
                return x + st.stack_res
            st.stack_in = x
        if st.skip:
            return x
        y = run(x, *args, **kwargs)
        if i == self.last:
            assert st.stack_in is not None
            st.stack_res = y - st.stack_in
        return y


def modulated_input(model: torch.nn.Module, x: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    """Block 0's adaLN-Zero-modulated input LayerNorm(x)·(1 + scale_msa) + shift_msa, (B, N, D).

    Calls ``norm1.forward`` directly so the block counter (a hook on ``norm1``) does not count it.
    """
    norm1 = model.transformer_blocks[0].norm1
    out = norm1.forward(x, block_kwargs.get("timestep"), block_kwargs.get("class_labels"), hidden_dtype=x.dtype)
    return out[0]


@torch.no_grad()
def fit_teacache(model: torch.nn.Module, run: Callable[[torch.nn.Module], Any], degree: int = 4) -> dict[str, Any]:
    """TeaCache's recipe on this model: over full generations driven by ``run(model)``, pair the relative
    L1 change of the modulated input with that of the model output between consecutive steps of the
    same stream, and fit ``np.polyfit(input_change, output_change, degree)``."""
    last: dict[bytes, tuple[float, torch.Tensor, torch.Tensor]] = {}  # stream -> (t, modulated, output)
    pending: list[tuple[bytes, float, torch.Tensor]] = []
    xs: list[float] = []
    ys: list[float] = []

    def pre(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["hidden_states"]  # (B, N, D): the block stack's input
        mod = modulated_input(model, x, kwargs)
        pending.append((stream_key(x, kwargs.get("class_labels")), float(kwargs["timestep"].max()), mod))

    def post(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        key, t, mod = pending.pop()
        out = output[0] if isinstance(output, tuple) else output.sample
        prev = last.get(key)
        if prev is not None and t < prev[0]:  # same generation (the timestep only decreases within one)
            xs.append(rel_l1(mod, prev[1]))
            ys.append(rel_l1(out, prev[2]))
        last[key] = (t, mod, out)

    handles = [
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
