"""The cached block: the block or its predictor under ``torch.cond``, with explicit functional state.

``insert_cache`` (``insert_cache.py``) puts one ``CachedBlock`` in place of every outlined block. Its
inputs are ``(*block_args, *state, step, force)`` and its outputs ``(*outputs, *state', computed[,
audit_error])``; the state layout is ``BlockLayout``'s (``block_state.py``). Under eager lowering the
branch is a Python ``if`` decided on the host (``_eager_forward``, ``eager_skip.py``); traced, it is
``cond`` plus a ``where`` per state tensor.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from fastcache_compile import approx, conformal, forecast, rule

from . import eager_skip
from .block_state import _PAIRS, _SHADOW, BlockLayout, _BlockBase, _contiguous_strides, _rel_error, _store, _tracing
from .reduce_stats import LOCAL, Reducer


class CachedBlock(_BlockBase):
    """Runs the block or its predictor under ``torch.cond``; returns (outputs..., state..., computed)."""

    def __init__(
        self,
        block: fx.GraphModule,
        layout: BlockLayout,
        tau: float,
        alpha: float,
        form: str,
        params: dict[str, torch.Tensor],
        reducer: Reducer = LOCAL,
        audit: bool = False,
    ) -> None:
        super().__init__(block, layout)
        self.tau, self.alpha, self.form, self.audit = tau, alpha, form, audit
        # Under context parallelism the statistic and its dof cover every rank's shard (reduce_stats).
        self.reducer = reducer
        params = dict(params)
        # forecast: the conformal cutoff is set here for this τ, α from the stored held-out (ê, e) pairs
        pred, err = params.pop("pred", None), params.pop("err", None)
        # pairs observed under caching (``calibrate(drift=...)``): their inputs and histories carry the
        # errors of earlier skips; the cutoff must pass the rank rule on them as well
        dpred, derr = params.pop("dpred", None), params.pop("derr", None)
        self._cutoff = None
        if pred is not None and err is not None:
            drifted = dpred is not None and derr is not None
            self._cutoff = (
                conformal.joint_cutoff(pred, err, dpred, derr, tau, alpha)
                if drifted
                else conformal.skip_cutoff(pred, err, tau, alpha)
            )
        self._e_hat: torch.Tensor | None = None  # the last ê, kept for pair recording (eager only)
        self._max_gap = None
        if form == "forecast" and "table" in params:
            rows, order = params["table"].shape
            self._max_gap = round(rows ** (1.0 / order))
        self._fitted = sorted(name.replace(".", "_") for name in params)
        for name, value in params.items():
            self.register_buffer(name.replace(".", "_"), value, persistent=False)
        self._thresholds: dict[int, float] = {}
        self.max_skips: int | None = None  # cap on consecutive skipped steps (``insert_cache``)
        self._host = eager_skip.HostTables()  # eager lowering's host copy of the table and coefficients

    def _threshold(self, dof: int) -> float:
        if dof not in self._thresholds:
            self._thresholds[dof] = rule.skip_threshold(self.tau, self.alpha, dof)
        return self._thresholds[dof]

    def _predict(self, k: int, args: tuple, x_hat: list, r_hat: list, r_prev: list, step, s, s_prev, fitted: dict):
        p = self.layout.pairs[k]
        if p is None:
            return r_hat[k].clone()  # no input of the same shape: reuse the cached output
        x = args[p].to(r_hat[k].dtype)
        xh = x_hat[self.layout.streams.index(p)].to(x.dtype)
        if self.form == "trajectory":
            return approx.trajectory(x, r_hat[k], r_prev[k], step, s, s_prev, fitted["beta"])
        if self.form == "linear":
            return approx.linear(x, xh, r_hat[k], fitted[f"a_{k}"])
        if self.form == "direct":
            return approx.direct(x, fitted[f"w_{k}"], fitted[f"b_{k}"])
        return approx.reuse(x, r_hat[k])

    def _forecast(self, k: int, args: tuple, res: list[list], step, steps: list, fitted: dict):
        """ŷ = x + Σ_m w_m r̂_m with the weight row of the current gap pattern (``forecast`` module)."""
        p = self.layout.pairs[k]
        if p is None or self._max_gap is None:
            return res[0][k].clone()  # unpaired output, or no weights fitted: reuse
        x = args[p].to(res[0][k].dtype)
        w = forecast.select_weights(fitted["table"], step, steps, self._max_gap)  # (K,)
        return forecast.forecast(x, [r[k] for r in res], w)

    def _decide(self, delta2, step, steps: list, force, dof: int) -> torch.Tensor:
        """True where the block computes: the χ² rule, or ``forecast``'s conformal rule and history checks."""
        if self.max_skips is not None:  # the last compute is more than max_skips steps back
            force = force | (step.float() - steps[0] > self.max_skips)
        if self.form != "forecast":
            return rule.should_compute(delta2, self._threshold(dof), force)
        gap = step.float() - steps[0]
        # A history not yet filled, or a skip that would leave a gap the table does not cover: skipping
        # only while t − s_1 < max_gap keeps every gap between computes ≤ max_gap.
        unfit = (steps[-1] < 0) if self._max_gap is None else (gap >= self._max_gap) | (steps[-1] < 0)
        force = force | unfit
        if self._cutoff is None:
            return rule.should_compute(delta2, self._threshold(dof), force)
        e_hat = conformal.predict_error(self.coef, conformal.error_features(delta2, gap, step))
        if _PAIRS:
            self._e_hat = e_hat
        # ~(ê ≤ c) computes on NaN; a non-finite δ² computes whatever ê says
        return force | ~(e_hat <= self._cutoff) | ~torch.isfinite(delta2)

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lay = self.layout
        n_out = len(lay.pairs)
        n_args = len(flat) - lay.num_state - 2
        args = flat[:n_args]
        state = flat[n_args : n_args + lay.num_state]
        step, force = flat[-2], flat[-1]
        x_hat, res_hist, steps = lay.split(state)
        xs = [args[p] for p in lay.streams]
        if not self.audit and not _tracing(flat):
            return self._eager_forward(args, xs, state, x_hat, res_hist, steps, step, force)
        delta2 = self.reducer.relative_change(xs, x_hat)  # () float32, the same on every rank
        dof = self.reducer.dof(xs)
        compute = self._decide(delta2, step, steps, force, dof)

        tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        consts = {i: a for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}
        n_t = len(tensor_pos)

        def rebuild(ops: tuple) -> tuple:
            full = dict(consts)
            full.update(zip(tensor_pos, ops[:n_t]))
            return tuple(full[i] for i in range(n_args))

        def run_block(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outs = tuple(self.block(*rebuild(ops)))
            # cond branches may not return (views of) their operands, and a block may hand an input
            # back through a no-op ``.to(dtype)``; the copy is one elementwise pass per output.
            # Both branches return contiguous tensors: cond needs matching strides, and a predictor
            # built on a transposed input (patch embedding) would not be.
            return tuple(o.clone(memory_format=torch.contiguous_format) for o in outs)

        n_fit = len(self._fitted)

        def predict(*ops: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a = rebuild(ops)
            st = ops[n_t : len(ops) - n_fit]
            fitted = dict(zip(self._fitted, ops[len(ops) - n_fit :]))
            xh, res, hs = lay.split(st[:-1])
            stp = st[-1]
            if self.form == "forecast":
                preds = (self._forecast(k, a, res, stp, hs, fitted) for k in range(n_out))
            else:
                rp = res[1] if lay.history > 1 else res[0]
                preds = (self._predict(k, a, xh, res[0], rp, stp, hs[0], hs[-1], fitted) for k in range(n_out))
            return tuple(p.contiguous() for p in preds)

        # The fitted maps are operands (not closure constants) so tracers and exporters see them as
        # inputs of the branch.
        fitted_values = [getattr(self, name) for name in self._fitted]
        # operand layout: the block's tensor arguments, its state (as ``lay.split`` reads it), the step
        operands = (
            *[args[i] for i in tensor_pos],
            *x_hat,
            *[r for res in res_hist for r in res],
            *steps,
            step.float(),
            *fitted_values,
        )
        # Inductor traces each branch with its operands' strides but may hand the branch a buffer of
        # another layout (e.g. the transposed patch embedding); contiguous operands avoid the mismatch.
        tracing = _tracing(operands)
        if tracing:
            # ``.contiguous()`` alone can be dropped by Inductor; force the layout it must have.
            operands = tuple(torch.ops.prims.inductor_force_stride_order(o, _contiguous_strides(o)) for o in operands)
        else:
            operands = tuple(o.contiguous() for o in operands)
        audit_out: tuple[torch.Tensor, ...] = ()
        if self.audit:
            # Both paths on the actual input, no branch: the true outputs give the skipped block's
            # relative error (0 where it computed), at the cost of a full computation.
            true, pred = run_block(*operands), predict(*operands)
            outs = tuple(torch.where(compute, t, p) for t, p in zip(true, pred))
            err = torch.stack([_rel_error(p, t) for p, t in zip(pred, true)]).amax()
            audit_out = (torch.where(compute, torch.zeros_like(err), err),)
            if not tracing and not bool(compute):
                self._record_skip(outs, true)  # the audit computed the true outputs already
        else:
            outs = tuple(torch.ops.higher_order.cond(compute, run_block, predict, operands))

        # Functional state update: keep the old state where the block was skipped; on a compute the
        # history shifts by one (newest first).
        res = self._residuals(args, outs)
        new_x_hat = [torch.where(compute, x, xh).contiguous() for x, xh in zip(xs, x_hat)]
        newer = [res, *res_hist[:-1]]
        new_res = [torch.where(compute, n, o) for m in range(lay.history) for n, o in zip(newer[m], res_hist[m])]
        newer_s = [step.float(), *steps[:-1]]
        new_steps = [torch.where(compute, n, o) for n, o in zip(newer_s, steps)]
        return (*outs, *new_x_hat, *new_res, *new_steps, compute, *audit_out)

    def _record_skip(self, outs: tuple, true: tuple) -> None:
        """A skip's true relative error (worst output, float32) for the active shadow / pair recorders."""
        err = max(float(_rel_error(o, t)) for o, t in zip(outs, true))
        if _SHADOW:  # benchmark-only check of the error bound
            _SHADOW[-1].append((self.layout.index, err))
        if _PAIRS and self._e_hat is not None:
            _PAIRS[-1].append((self.layout.index, float(self._e_hat), err))

    def _eager_forward(self, args: tuple, xs: list, state: tuple, x_hat, res_hist, steps, step, force) -> tuple:
        """Eager lowering: the decision is read on the host once (eager ``cond`` reads it too) and made
        there (``eager_skip``); a skipped block hands its state back untouched, a computed one shifts its
        history without a select pass per tensor."""
        forced = bool(force)
        if forced and self.reducer is LOCAL:
            # A forced step (warm-up, refresh, last step) computes whatever the statistic says, so it is
            # not measured (a pass over x and x̂ per stream). Under a process group the statistic is a
            # collective and stays, so every rank keeps calling it.
            return self._eager_compute(force, args, xs, step.float(), state)
        delta2 = float(self.reducer.relative_change(xs, x_hat))
        t, hs = float(step), [float(s) for s in steps]
        if self._host_computes(delta2, t, hs, forced, self.reducer.dof(xs)):
            flag = torch.ones((), dtype=torch.bool, device=step.device)
            return self._eager_compute(flag, args, xs, step.float(), state)
        outs = self._host_predict(args, x_hat, res_hist, step, steps, t, hs)
        if _SHADOW or (_PAIRS and self._e_hat is not None):  # what would the block have given?
            # contiguous as the cond branch returns them: the norm's summation order then matches
            self._record_skip(outs, tuple(o.contiguous() for o in self.block(*args)))
        return (*outs, *state, torch.zeros((), dtype=torch.bool, device=step.device))

    def _host_tables(self) -> eager_skip.HostTables:
        return self._host.update(getattr(self, "table", None), getattr(self, "coef", None))

    def _host_computes(self, delta2: float, t: float, hs: list[float], forced: bool, dof: int) -> bool:
        """``_decide`` on host floats: the same rule, without a tensor op per term."""
        if forced or (self.max_skips is not None and t - hs[0] > self.max_skips):
            return True
        if self.form == "forecast":
            gap = t - hs[0]
            if hs[-1] < 0 or (self._max_gap is not None and gap >= self._max_gap):
                return True
            if self._cutoff is not None:
                e_hat = eager_skip.predicted_error(self._host_tables().coef, delta2, gap, t)
                if _PAIRS:
                    self._e_hat = e_hat
                return not e_hat <= self._cutoff or not math.isfinite(delta2)
        return not delta2 <= self._threshold(dof)

    def _host_predict(self, args: tuple, x_hat: list, res_hist: list[list], step, steps: list, t, hs) -> tuple:
        """The skipped block's outputs; the forecast's weight row is looked up on the host."""
        lay = self.layout
        if self.form != "forecast":
            fitted = {name: getattr(self, name) for name in self._fitted}
            rp = res_hist[1] if lay.history > 1 else res_hist[0]
            preds = [
                self._predict(k, args, x_hat, res_hist[0], rp, step.float(), steps[0], steps[-1], fitted)
                for k in range(len(lay.pairs))
            ]
            return tuple(p.contiguous() for p in preds)
        w = None
        if self._max_gap is not None:
            w = self._host_tables().rows[eager_skip.pattern_row(t, hs, self._max_gap)]
        preds = []
        for k, p in enumerate(lay.pairs):
            newest = res_hist[0][k]
            if p is None or w is None:
                preds.append(newest.clone())  # unpaired output, or no weights fitted: reuse
            else:
                preds.append(eager_skip.weighted_sum(args[p].to(newest.dtype), [r[k] for r in res_hist], w))
        return tuple(p.contiguous() for p in preds)

    def _eager_compute(self, compute, args, xs, step, state) -> tuple:
        """A computed block in eager: its outputs, and the state with the history shifted by one."""
        lay = self.layout
        x_hat, res_hist, steps = lay.split(state)
        outs = tuple(self.block(*args))
        # The new state is written into the storage it replaces: the retiring oldest residual and the
        # old x̂. Fresh activation-sized state tensors each step cost the allocator new pages (in eager
        # on CPU, freed state is often handed back to the OS and faulted in again: ~15 % of a step at
        # batch 100). The slot owns these tensors (``RecordingBlock`` copies what it stores), so nothing
        # else sees the writes; the runtime drops a slot's state if a call fails half-way.
        res = [_store(old, o, None if p is None else args[p]) for old, o, p in zip(res_hist[-1], outs, lay.pairs)]
        newer = [res, *res_hist[:-1]]
        new_steps = [step, *steps[:-1]]
        x_new = [_store(xh, x) for xh, x in zip(x_hat, xs)]
        return (*outs, *x_new, *[r for rs in newer for r in rs], *new_steps, compute)
