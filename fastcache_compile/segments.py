"""Host dispatch of a segment program: the cond-free ``Variant.cached``.

    runner = SegmentRunner(split_segments(outlined, tau, alpha, form, params), lower=inductor_per_segment)
    outs = runner(*args, *state, step, force)        # (*outputs, *new state, computed): the cond form's layout

Per block the runner runs ``pre_i`` (glue and the statistic δ²), reads δ² once on the host (the only
device→host synchronisation per block), and runs ``compute_i`` or ``predict_i``. The state update is
the cond form's ``torch.where`` written on the host: a computed block's state becomes
``(x, r, r̂, step, s)``, a skipped block keeps its state tensors as they are. Each segment is lowered
lazily by ``lower(graph, example_inputs)`` on its first call (static shapes), so a segment that never
runs (e.g. a predictor during warm-up) is never compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from .passes.insert_cache import _SHADOW
from .passes.segments import SegmentProgram, SegmentSpec

Lower = Callable[[fx.GraphModule, list[Any]], Callable[..., Any]]


def eager(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """No lowering: run the segment graphs as they are (debugging, the reference in tests)."""
    return gm


def inductor(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor per segment (``lowering="segments"``)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def inductor_cudagraphs(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor per segment with CUDA graphs: each static segment is captured once and replayed."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches={"triton.cudagraphs": True})


class SegmentRunner:
    """Callable with the signature and outputs of ``insert_cache``'s graph, without ``torch.cond``."""

    def __init__(
        self,
        program: SegmentProgram,
        lower: Lower = eager,
        segments: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.program = program
        self.meta = dict(program.meta)  # what the backend reads from a cached graph
        self._lower = lower
        # Pre-lowered segments (e.g. ONNX Runtime sessions) by name; the rest are lowered on first use.
        self._fns: dict[str, Callable[..., Any]] = dict(segments or {})
        self.calls: dict[str, int] = {}  # per segment: how often it ran (tests, benchmarks)
        self._free = self._liveness()

    def _liveness(self) -> dict[str, list[str]]:
        # After each block (and the post segment) drop the values nothing later reads, so the
        # environment does not keep every block's activations alive until the end of the call.
        prog = self.program
        groups = {f"block_{b.layout.index}": [b.pre, b.compute, b.predict] for b in prog.blocks}
        # the block's own values (y, r, δ²) are consumed within its step
        free = {f"block_{b.layout.index}": [*b.compute.outputs, b.statistic] for b in prog.blocks}
        if prog.post is not None:
            groups["post"], free["post"] = [prog.post], []
        last: dict[str, str] = {}
        for key, specs in groups.items():
            for spec in specs:
                last.update((name, key) for name in spec.inputs)
        for name, key in last.items():
            if name not in prog.outputs:
                free[key].append(name)
        return free

    def _run(self, spec: SegmentSpec, env: dict[str, Any]) -> None:
        args = [env[n] for n in spec.inputs]
        fn = self._fns.get(spec.name)
        if fn is None:
            fn = self._fns[spec.name] = self._lower(self.program.modules[spec.name], args)
        outs = fn(*args)
        env.update(zip(spec.outputs, outs))
        self.calls[spec.name] = self.calls.get(spec.name, 0) + 1

    def __call__(self, *flat: Any) -> tuple[Any, ...]:
        prog = self.program
        if len(flat) != len(prog.inputs):
            raise ValueError(f"the segment program takes {len(prog.inputs)} inputs, got {len(flat)}")
        env: dict[str, Any] = dict(zip(prog.inputs, flat))
        force = bool(env["fc_force"])  # a host-made tensor (runtime): no device sync
        step = env["fc_step"]
        new_state: list[Any] = []
        flags: list[bool] = []
        device = None
        for blk in prog.blocks:
            self._run(blk.pre, env)
            stat = env[blk.statistic]
            device = stat.device if isinstance(stat, torch.Tensor) else device
            # ``not (δ² <= thr)`` is True for NaN: a non-finite statistic computes (rule.should_compute).
            # A forced step needs no statistic, so it does not wait for the device.
            compute = force or not float(stat) <= blk.threshold
            state = [env[n] for n in blk.state]
            n_str, n_out = len(blk.streams), len(blk.layout.pairs)
            if compute:
                self._run(blk.compute, env)
                ys = [env[n] for n in blk.compute.outputs[:n_out]]
                res = [env[n] for n in blk.compute.outputs[n_out:]]
                r_hat = state[n_str : n_str + n_out]
                x_new = [env[n].contiguous() for n in blk.streams]
                new_state += [*x_new, *res, *r_hat, step.float(), state[-2]]
            else:
                self._run(blk.predict, env)
                ys = [env[n] for n in blk.predict.outputs]
                new_state += state
                if _SHADOW and isinstance(stat, torch.Tensor):
                    self._shadow(blk, env, ys)
            flags.append(compute)
            for name, k in blk.aliases:
                env[name] = ys[k]
            for name in self._free[f"block_{blk.layout.index}"]:
                env.pop(name, None)
        if prog.post is not None:
            self._run(prog.post, env)
        outs = [env[n] for n in prog.outputs]
        computed = torch.tensor(flags, dtype=torch.bool, device=device)
        return (*outs, *new_state, computed)

    def _shadow(self, blk: Any, env: dict[str, Any], ys: Sequence[torch.Tensor]) -> None:
        # Benchmark-only audit, as CachedBlock does it: what would the block have given?
        fn = self._fns.get(blk.compute.name) or self.program.modules[blk.compute.name]
        true = fn(*[env[n] for n in blk.compute.inputs])[: len(ys)]
        err = max(float((o - t).norm() / t.norm().clamp_min(1e-12)) for o, t in zip(ys, true))
        _SHADOW[-1].append((blk.layout.index, err))
