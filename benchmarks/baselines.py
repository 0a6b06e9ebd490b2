"""Benchmark-only cache baselines for the eager reference models (not part of the library).

Every baseline is a context manager over the *uncompiled* transformer: ``with method: sample(method.model,
...)``; ``method.reset()`` between generations; ``method.flops_skipped()`` after the timed generations.

    none      no cache

The step caches (``benchmarks.step_caches``) build on ``Baseline``:

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
