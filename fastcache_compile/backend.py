"""The ``fastcache`` torch.compile backend: a short pipeline of graph passes, then a lowering.

    Dynamo graph ─ specialize_symints ─ find_blocks ─ outline_blocks ─┬─ insert_recording ─ lower  (init)
                                                                        └─ insert_cache ───── lower  (cached)

Inductor lowering first lets identical blocks share one body (``share_repeated_blocks``).

Variants are built at the first call with each input signature (so every compiled graph is
static-shaped) and held by a ``CacheRuntime``, which carries the cache state between calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from . import calibration as _calibration
from .config import FastCacheConfig, check_token_count
from .diffusers_hooks import Refusing, traced_owners
from .passes import BlockPlanError, find_blocks, insert_cache, insert_recording, outline_blocks, specialize_symints
from .passes.insert_cache import state_history
from .passes.retarget import clone_graph_module
from .passes.select_tokens import TokenPlanError, insert_token_select
from .passes.share_blocks import share_repeated_blocks, unshare
from .runtime import CacheRuntime, Variant, _warn_once, _warned  # noqa: F401  (_warned: tests clear it)

log = logging.getLogger(__name__)


def _lower(gm: fx.GraphModule, example_inputs: Sequence[Any], lowering: str) -> Callable:
    if lowering == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    # identical blocks are lowered once (most of the compile time of a deep stack)
    shared = share_repeated_blocks(gm)
    try:
        return compile_fx(gm, list(example_inputs))
    except Exception as err:
        if not shared:
            raise
        # a graph Inductor cannot lower with shared bodies still compiles, block by block; on a copy, since
        # the failed attempt left Dynamo metadata on this one that a second attempt trips over
        unshare(shared)
        _warn_once(
            f"fastcache: Inductor could not lower the shared block bodies ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); compiling every block on its own"
        )
        return compile_fx(clone_graph_module(gm), list(example_inputs))


_SEGMENTED = ("segments", "tensorrt")


def _block_cache(outlined: fx.GraphModule, config: FastCacheConfig, form: str, params: Any) -> Callable:
    """The cached variant: one graph with a ``torch.cond`` per block, or (``lowering="segments"`` /
    ``"tensorrt"``) static segments with the decision read on the host between them."""
    if config.lowering not in _SEGMENTED:
        return insert_cache(
            outlined, config.threshold, config.alpha, form, params, audit=config.audit, max_skips=config.max_skips
        )
    if form == "forecast" or config.audit:
        raise ValueError(
            "approximation='forecast' and audit=True are not available with segment lowerings yet; "
            "use lowering='inductor' (or approximation='trajectory', audit=False)"
        )
    from .passes.segments import split_segments
    from .segments import SegmentRunner, inductor

    lower = inductor
    if config.lowering == "tensorrt":
        from .export.tensorrt_segments import tensorrt_lowering as lower  # ImportError names the package
    return SegmentRunner(split_segments(outlined, config.threshold, config.alpha, form, params), lower)


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
    owners = traced_owners()
    if not owners:
        return _compile(gm, example_inputs, config)
    # A diffusers cache hook on the model leaves fastcache without a block stack (or two caches on
    # one model): a graph traced under one refuses to run while the hook stays, and is compiled only
    # if it is ever called after the hook was removed.
    lazy: dict[str, Callable] = {}

    def after_removal(*args: Any) -> Any:
        if "fn" not in lazy:
            lazy["fn"] = _compile(gm, list(args), config)
        return lazy["fn"](*args)

    return Refusing(after_removal, owners)


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], config: FastCacheConfig) -> Callable:
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
                    max_skips=config.max_skips,
                )
                num_tokens = plan.num_tokens
                check_token_count(config, num_tokens)
            except TokenPlanError as err:
                _warn_once(f"fastcache: token selection/merging not applied ({err}); using block-level caching only")
        if num_tokens is None:
            cached = _block_cache(cached, config, form, params)
            init = insert_recording(_outlined(graph, args), history=state_history(form, params))
        n_out = cached.meta["fastcache_num_outputs"]
        seq = cached.meta["fastcache_output_is_seq"]
        init_fn = _lower(init, [*args, torch.tensor(0.0)], config.lowering)
        # The cached variant is lowered lazily on its first call, with the real state as example.
        lazy: dict[str, Callable] = {}

        def cached_fn(*call_args: Any) -> Any:
            if "fn" not in lazy:
                # a segment program lowers its own segments, one static graph each
                segmented = config.lowering in _SEGMENTED
                lazy["fn"] = cached if segmented else _lower(cached, call_args, config.lowering)
            return lazy["fn"](*call_args)

        layouts = cached.meta["fastcache_layouts"]
        audit = config.audit and num_tokens is None
        return Variant(init_fn, cached_fn, n_out, seq, layouts, fingerprint, num_tokens, audit=audit)

    def plain(args: Sequence[Any]) -> Callable:
        # Lowered with the call's own inputs: holding the first call's would keep that model alive.
        _warn_once(
            "fastcache: inputs or parameters require grad; running the uncached graph (caching is "
            "inference-only: call the model under torch.no_grad() or after model.requires_grad_(False))"
        )
        return _lower(clone_graph_module(gm), list(args), config.lowering)

    log.info("fastcache: %d blocks found", num_blocks)
    admit = calib.check_instance if calib is not None else None
    return CacheRuntime(gm, example_inputs, config, build, plain, admit)
