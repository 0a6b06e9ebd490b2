"""The ``fastcache`` torch.compile backend: a short pipeline of graph passes, then a lowering.

    Dynamo graph ─ specialize_symints ─ find_blocks ─ outline_blocks ─┬─ insert_recording ─ lower  (init)
                                                                        └─ insert_cache ───── lower  (cached)

Variants are built at the first call with each input signature (so every compiled graph is
static-shaped) and held by a ``CacheRuntime``, which carries the cache state between calls.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from . import calibration as _calibration
from .config import FastCacheConfig
from .passes import BlockPlanError, find_blocks, insert_cache, insert_recording, outline_blocks, specialize_symints
from .passes.retarget import clone_graph_module
from .passes.select_tokens import TokenPlanError, insert_token_select
from .runtime import CacheRuntime, Variant

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _lower(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: str) -> Callable:
    if lowering == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def _outlined(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    return outline_blocks(find_blocks(specialize_symints(clone_graph_module(gm), args)))


def resolve_form(approximation: str, calib: _calibration.Calibration | None) -> str:
    """The skip-path form to use; "auto" picks the measured best one."""
    form = approximation
    if form == "auto":
        # Measured on the reference DiT at equal skip rates (benchmarks/results/compare.md): the fitted
        # trajectory form beat reuse by up to 9 dB and matched or beat the D×D linear map at a lower cost.
        form = "trajectory" if calib is not None else "reuse"
    if form != "reuse" and calib is None:
        raise ValueError(
            f"approximation={form!r} needs fitted maps: pass calibration=<file from fastcache_compile.calibrate>"
        )
    return form


def fastcache_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: FastCacheConfig | dict[str, Any] | None = None,
) -> Callable:
    """``torch.compile(model, backend="fastcache", options=...)`` lands here."""
    config = FastCacheConfig.from_options(options)
    try:
        plan_probe = find_blocks(clone_graph_module(gm))
    except BlockPlanError as err:
        _warn_once(f"fastcache: {err}; compiling this graph without caching (lowering={config.lowering!r})")
        return _lower(gm, example_inputs, config.lowering)
    num_blocks = len(plan_probe.meta["fastcache_plan"].blocks)
    calib = _calibration.load(config.calibration) if config.calibration is not None else None
    form = resolve_form(config.approximation, calib)

    def build(graph: fx.GraphModule, args: Sequence[Any]) -> Variant:
        cached = _outlined(graph, args)
        fingerprint = _calibration.graph_fingerprint(cached, list(args))
        if calib is not None:
            calib.check(cached, list(args))
        params = calib.block_params(form) if calib is not None else None
        num_tokens: int | None = None
        if config.token_select or config.token_merge:
            try:
                init, cached, plan = insert_token_select(
                    cached,
                    args,
                    tau=config.threshold,
                    alpha=config.alpha,
                    form=form,
                    params=params,
                    buckets=config.token_buckets,
                    select=config.token_select,
                    token_threshold=config.token_threshold,
                    merge=config.token_merge,
                    merge_ratio=config.merge_ratio,
                    merge_k=config.merge_k,
                    merge_lambda=config.merge_lambda,
                    # the static-token correction is a fitted map: used with the fitted forms only
                    static_w=calib.stack_params().get("w") if calib is not None and form != "reuse" else None,
                )
                num_tokens = plan.num_tokens
            except TokenPlanError as err:
                _warn_once(f"fastcache: token selection/merging not applied ({err}); using block-level caching only")
        if num_tokens is None:
            cached = insert_cache(cached, config.threshold, config.alpha, form, params)
            init = insert_recording(_outlined(graph, args))
        n_out = cached.meta["fastcache_num_outputs"]
        seq = cached.meta["fastcache_output_is_seq"]
        init_fn = _lower(init, [*args, torch.tensor(0.0)], config.lowering)
        # The cached variant is lowered lazily on its first call, with the real state as example.
        lazy: dict[str, Callable] = {}

        def cached_fn(*call_args: Any) -> Any:
            if "fn" not in lazy:
                lazy["fn"] = _lower(cached, call_args, config.lowering)
            return lazy["fn"](*call_args)

        return Variant(init_fn, cached_fn, n_out, seq, cached.meta["fastcache_layouts"], fingerprint, num_tokens)

    def plain() -> Callable:
        _warn_once("fastcache: inputs require grad; running the uncached graph (caching is inference-only)")
        return _lower(clone_graph_module(gm), example_inputs, config.lowering)

    log.info("fastcache: %d blocks found", num_blocks)
    runtime = CacheRuntime(gm, example_inputs, config, build, plain)
    if runtime.timestep_input is None:
        # Without a timestep the runtime cannot see a new generation start; say so rather than let a
        # cache silently carry over (the skip test still recomputes blocks whose input moved).
        _warn_once(
            "fastcache: no timestep input recognised by name; call fastcache_compile.reset(model) before "
            "each new generation"
        )
    return runtime
