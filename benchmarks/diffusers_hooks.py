"""diffusers' own cache hooks on the reference models, as benchmark baselines (``Baseline`` interface).

``DiTTransformer2DModel`` and ``SD3Transformer2DModel`` in diffusers 0.42.1 lack ``CacheMixin``, so
``model.enable_cache(config)`` raises ``AttributeError``. ``CacheMixin`` needs nothing from the model
class (it only walks modules and registers hooks), so ``with_cache_mixin`` gives a *copy* of the model
whose class mixes it in; the hooks, their state and ``cache_context`` are then diffusers' own code. Each
method gets its own copy because disabling a cache leaves hook registries behind on the modules.

CFG streams (``cfg="split"``): the sampling loop enters ``cache_context("cond")`` / ``("uncond")``
around the two calls of a step, as diffusers pipelines do. FirstBlockCache, MagCache and TaylorSeer keep
their state in a ``StateManager`` per context name, so they are per stream as shipped. Pyramid
Attention Broadcast keeps one state per attention module whatever the context, so a split uncond call
would reuse the cond call's attention; ``PyramidBroadcast`` swaps a state object per stream (keyed by
the conditioning inputs of the model call) into every PAB hook before each model call.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from diffusers import hooks as dh
from diffusers.hooks.pyramid_attention_broadcast import (
    _PYRAMID_ATTENTION_BROADCAST_HOOK,
    PyramidAttentionBroadcastState,
)
from diffusers.models.cache_utils import CacheMixin

from benchmarks.baselines import Baseline, block_family, call_key
from benchmarks.metrics import psnr


def with_cache_mixin(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose class also derives from diffusers' ``CacheMixin``."""
    dup = copy.deepcopy(model)
    if not isinstance(dup, CacheMixin):
        dup.__class__ = type(f"{type(model).__name__}WithCache", (CacheMixin, type(model)), {})
    return dup


def _hooked_modules(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if getattr(getattr(m, "_diffusers_hook", None), "hooks", None))


class DiffusersCache(Baseline):
    """``model.enable_cache(make_config(self))`` while active; ``_reset_stateful_cache`` between generations."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        setting: str,
        make_config: Callable[[DiffusersCache], Any],
        granularity: str = "block",
    ) -> None:
        super().__init__(with_cache_mixin(model), setting)
        self.method = method
        self.granularity = granularity
        self.make_config = make_config
        self.timestep = 1000  # the current step's timestep, for hooks that ask for it by callback
        self._pre = None

    def _apply(self) -> None:
        self._pre = self.model.register_forward_pre_hook(self._on_call, with_kwargs=True)
        self.model.enable_cache(self.make_config(self))
        if _hooked_modules(self.model) == 0:
            # A cache whose module patterns match nothing silently runs uncached: report, do not time it.
            self.model.disable_cache()
            raise RuntimeError(f"{self.method} registered no hook: its module patterns match no module of this model")

    def _remove(self) -> None:
        if self._pre is not None:
            self._pre.remove()
        if self.model.is_cache_enabled:
            self.model.disable_cache()

    def reset(self) -> None:
        self.model._reset_stateful_cache()

    def _on_call(self, _: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.timestep = int(kwargs["timestep"].max())


class PyramidBroadcast(DiffusersCache):
    """PAB with one hook state per CFG stream (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, skip_range: int) -> None:
        def make(me: DiffusersCache) -> Any:
            return dh.PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=skip_range, current_timestep_callback=lambda: me.timestep
            )

        super().__init__(model, "diffusers-pab", f"skip_range={skip_range}", make, granularity="attention")
        self.states: dict[bytes, list[PyramidAttentionBroadcastState]] = {}
        self._pab_hooks: list[Any] = []

    def _apply(self) -> None:
        super()._apply()
        regs = [getattr(m, "_diffusers_hook", None) for m in self.model.modules()]
        hooks = [r.get_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK) for r in regs if r is not None]
        self._pab_hooks = [h for h in hooks if h is not None]

    def reset(self) -> None:
        super().reset()
        self.states.clear()

    def _on_call(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        super()._on_call(module, args, kwargs)
        key = call_key(args, kwargs)
        if key not in self.states:
            self.states[key] = [PyramidAttentionBroadcastState() for _ in self._pab_hooks]
        for hook, state in zip(self._pab_hooks, self.states[key]):
            hook.state = state  # this stream's cache and iteration counter


def first_block_cache(model: torch.nn.Module, threshold: float) -> DiffusersCache:
    return DiffusersCache(
        model, "diffusers-fbc", f"thr={threshold:g}", lambda _: dh.FirstBlockCacheConfig(threshold=threshold)
    )


def whole_blocks(model: torch.nn.Module) -> list[str]:
    """TaylorSeer identifiers for whole transformer blocks (diffusers' default forecasts attention only).

    An SD3 block with ``context_pre_only`` returns ``None`` for the text stream, which diffusers'
    TaylorSeer cannot hold (it reads every output's dtype); such blocks run uncached. Flux's
    single-stream blocks are included.
    """
    blocks = model.transformer_blocks
    keep = [str(i) for i, b in enumerate(blocks) if not getattr(b, "context_pre_only", False)]
    out = [rf"transformer_blocks\.({'|'.join(keep)})"]
    if len(getattr(model, "single_transformer_blocks", ())):  # Flux: the single-stream blocks as well
        out.append(r"single_transformer_blocks\.\d+")
    return out


def taylorseer(
    model: torch.nn.Module, interval: int, order: int = 1, identifiers: list[str] | None = None
) -> DiffusersCache:
    """TaylorSeer with Taylor order ``order`` (diffusers' ``max_order``), refreshing every ``interval`` steps.

    ``identifiers`` default to diffusers' own (``^transformer_blocks.*attn``, ``re.fullmatch``): on the
    MMDiT that matches each block's joint attention (``transformer_blocks.<i>.attn``), so attention is
    forecast and the feed-forwards run. DiT names self-attention ``attn1``, which the default misses;
    there whole blocks (``transformer_blocks\\.\\d+``) are cached instead.
    """
    if order < 1:
        raise ValueError(f"TaylorSeer order must be >= 1, got {order}")
    setting = f"interval={interval}" + ("" if identifiers is None else " whole blocks")
    if identifiers is None and block_family(model).attention == "attn1":
        identifiers = [r"transformer_blocks\.\d+"]
    granularity = "attention" if identifiers is None else "block"

    def make(_: DiffusersCache) -> Any:
        return dh.TaylorSeerCacheConfig(
            cache_interval=interval, max_order=order, taylor_factors_dtype=torch.float32, cache_identifiers=identifiers
        )

    return DiffusersCache(model, f"diffusers-taylorseer-o{order}", setting, make, granularity)


_MAG_RE = re.compile(r"MagCacheConfig\(mag_ratios=\.\.\.\):\s*\n(\[[^\]]*\])")


@torch.no_grad()
def calibrate_magcache(model: torch.nn.Module, run: Callable[[torch.nn.Module], Any], steps: int) -> list[float]:
    """diffusers' documented recipe: one run with ``MagCacheConfig(calibrate=True)`` prints the ratios.

    The hook prints them once per stream (and clears them), so the printed lists are captured and
    averaged elementwise (split CFG gives a cond and an uncond list).
    """
    dup = with_cache_mixin(model)
    dup.enable_cache(dh.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            run(dup)
    finally:
        dup.disable_cache()
    lists = [[float(v) for v in m.strip("[]").split(",")] for m in _MAG_RE.findall(buf.getvalue())]
    lists = [r for r in lists if len(r) == steps]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratio list of length {steps}: {buf.getvalue()[:300]!r}")
    return [sum(col) / len(col) for col in zip(*lists)]


def magcache(model: torch.nn.Module, threshold: float, ratios: list[float], steps: int) -> DiffusersCache:
    def make(_: DiffusersCache) -> Any:
        return dh.MagCacheConfig(threshold=threshold, mag_ratios=list(ratios), num_inference_steps=steps)

    return DiffusersCache(model, "diffusers-magcache", f"thr={threshold:g}", make)


PROBE_NOTES = {
    "FirstBlockCacheConfig()": "works on DiT (swept as diffusers-fbc); its default threshold 0.05 did not fire in "
    "our 10- and 50-step runs",
    "TaylorSeerCacheConfig() [default identifiers]": "'^transformer_blocks.*attn' must fullmatch, DiT names it attn1; "
    "swept as diffusers-taylorseer with cache_identifiers=[transformer_blocks.<i>]",
    "TaylorSeerCacheConfig(use_lite_mode=True)": "lite mode zeroes every block and caches 'proj_out', which DiT "
    "lacks (proj_out_1/proj_out_2)",
    "MagCacheConfig(calibrate=True)": "calibration mode never skips by design; its printed ratios feed the "
    "diffusers-magcache rows",
    "FasterCacheConfig(spatial=2)": "its attention hook permutes to 5-D, i.e. assumes video latents",
    "SeaCacheConfig()": "needs a flow-matching sigma in [0, 1] in cache_context (a DDIM loop has none) and a "
    "raw_vision_callback for models without a built-in adapter; without them it stays fail-open (never skips)",
}


def probe_configs(steps: int) -> dict[str, Callable[[DiffusersCache], Any]]:
    """Every cache config of diffusers 0.42.1 that could apply to a DiT, in its documented/default form,
    for the compatibility table (``compare`` runs each briefly and records what happens)."""
    return {
        "FirstBlockCacheConfig()": lambda _: dh.FirstBlockCacheConfig(),
        "PyramidAttentionBroadcastConfig(spatial=2)": lambda me: dh.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: me.timestep
        ),
        "TaylorSeerCacheConfig() [default identifiers]": lambda _: dh.TaylorSeerCacheConfig(),
        "TaylorSeerCacheConfig(use_lite_mode=True)": lambda _: dh.TaylorSeerCacheConfig(use_lite_mode=True),
        "MagCacheConfig(calibrate=True)": lambda _: dh.MagCacheConfig(calibrate=True, num_inference_steps=steps),
        "FasterCacheConfig(spatial=2)": lambda me: dh.FasterCacheConfig(
            spatial_attention_block_skip_range=2, current_timestep_callback=lambda: me.timestep
        ),
        "SeaCacheConfig()": lambda _: dh.SeaCacheConfig(),
    }


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0])


def probe(
    model: torch.nn.Module, generate: Callable[[torch.nn.Module], torch.Tensor], steps: int
) -> dict[str, dict[str, str]]:
    """Run every config of ``probe_configs`` once through ``generate(model) -> images`` (a short
    generation of ``steps`` steps) and record whether it fails, skips nothing, or works."""
    out: dict[str, dict[str, str]] = {}
    plain = generate(model)
    logger = logging.getLogger("diffusers")
    for name, make in probe_configs(steps).items():
        method = DiffusersCache(model, "probe", name, make)
        capture = _Capture()
        logger.addHandler(capture)
        try:
            with method, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                img = generate(method.model)
            blocks, attn = method.counter.block_skip_fraction(), method.counter.attention_skip_fraction()
            quality = psnr(img, plain)
            detail = f"PSNR {quality:.1f} dB vs. uncached ({steps} steps); skipped blocks {blocks:.0%}, attn {attn:.0%}"
            if blocks == 0.0 and attn == 0.0:
                status = "runs, skips nothing"
            elif quality < 15.0:
                status = "runs, output destroyed"
            else:
                status = "works"
        except Exception as err:
            status, detail = "fails", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        finally:
            logger.removeHandler(capture)
        if capture.messages:
            detail += "; diffusers warned: " + " / ".join(dict.fromkeys(m[:160] for m in capture.messages))
        note = PROBE_NOTES.get(name)
        out[name] = {"status": status, "detail": f"{note}; {detail}" if note else detail}
    return out
