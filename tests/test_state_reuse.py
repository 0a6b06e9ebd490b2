"""Eager caching writes a computed block's new state into the storage it replaces (fresh activation-sized
state tensors each step cost the allocator new pages on a CPU); the state stays the cache's own."""

import pytest
import torch
from torch import fx, nn

import fastcache_compile as fc
from fastcache_compile.passes.block_state import BlockLayout, RecordingBlock
from fastcache_compile.passes.cached_block import CachedBlock
from fastcache_compile.runtime import owners_of_model
from models import CASES, compile_eager, sample


class _Block(nn.Module):
    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0 + c, c + 1.0  # a paired output (x's update) and an unpaired one


LAYOUT = BlockLayout(index=0, streams=(0,), pairs=(0, None), history=3)


def _blocks() -> tuple[RecordingBlock, CachedBlock]:
    graph = fx.symbolic_trace(_Block())
    return RecordingBlock(graph, LAYOUT), CachedBlock(graph, LAYOUT, tau=0.1, alpha=0.05, form="reuse", params={})


def _ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_recorded_state_owns_its_storage():
    record, _ = _blocks()
    x, c = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    *outs, _computed = record(x, c, torch.tensor(0.0))
    outs, state = outs[:2], outs[2:]
    # x̂ and the unpaired output's value are copies: later in-place state writes must not reach the
    # graph's activations, inputs or outputs
    assert not _ptrs(state[: 1 + 2 * LAYOUT.history]) & _ptrs([x, c, *outs])
    assert torch.equal(state[0], x) and torch.equal(state[2], outs[1])


def test_computed_step_reuses_the_retiring_storage_and_shifts_history():
    record, cached = _blocks()
    x0, c0 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    state = list(record(x0, c0, torch.tensor(0.0))[2:-1])
    x_hat, res, _steps = LAYOUT.split(state)
    oldest, old_x_hat, newest = _ptrs(res[-1]), _ptrs(x_hat), [r.clone() for r in res[0]]
    x1, c1 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    out = cached(x1, c1, *state, torch.tensor(1.0), torch.tensor(True))
    y, u, new_state, computed = out[:2], out[1], out[2:-1], out[-1]
    new_x_hat, new_res, new_steps = LAYOUT.split(new_state)
    assert bool(computed)
    assert _ptrs(new_res[0]) == oldest and _ptrs(new_x_hat) == old_x_hat  # written in place
    torch.testing.assert_close(new_x_hat[0], x1)
    torch.testing.assert_close(new_res[0][0], y[0] - x1)
    torch.testing.assert_close(new_res[0][1], u)
    assert all(torch.equal(a, b) for a, b in zip(new_res[1], newest))  # history shifted by one
    assert [float(s) for s in new_steps] == [1.0, 0.0, -1.0]
    assert not _ptrs(new_state[: 1 + 2 * LAYOUT.history]) & _ptrs([x1, c1, *y])


def test_failed_call_drops_the_streams_state(built, monkeypatch):
    model, case = built["dit"], CASES["dit"]
    cm = compile_eager(model, threshold=0.05)
    first = sample(cm, case, steps=3)
    slots = [s for o in owners_of_model(model) for p in o.parts.values() for s in p.slots.values()]
    assert slots and all(s.state is not None for s in slots)

    def fail(self, *args, **kwargs):
        if self.layout.index == 1:
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    real = CachedBlock._eager_compute
    monkeypatch.setattr(CachedBlock, "_eager_compute", fail)
    with pytest.raises(RuntimeError, match="injected"):
        sample(cm, case, steps=3)
    # block 0 had already written the failed step's state: the slot must not be read again
    assert all(s.state is None for s in slots)
    monkeypatch.undo()
    fc.reset(cm)
    assert torch.equal(sample(cm, case, steps=3), first)


def test_forced_steps_do_not_measure_the_statistic(built, monkeypatch):
    from fastcache_compile.passes.reduce_stats import LocalStats

    model, case = built["dit"], CASES["dit"]
    calls = []
    real = LocalStats.relative_change
    monkeypatch.setattr(LocalStats, "relative_change", lambda self, xs, refs: calls.append(1) or real(self, xs, refs))
    cm = compile_eager(model, threshold=0.05, warmup_steps=2, refresh_every=3)
    sample(cm, case, steps=7, cfg=None)
    st = fc.stats(cm)
    blocks = (st["blocks_computed"] + st["blocks_skipped"]) // 7
    # step 0 initialises; steps 1, 3, 6 are forced (warm-up, refresh every 3): 3 measured steps of 7
    assert len(calls) == 3 * blocks


def test_state_made_in_inference_mode_is_replaced_outside_it():
    record, cached = _blocks()
    x0, c0 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    with torch.inference_mode():
        state = list(record(x0, c0, torch.tensor(0.0))[2:-1])
    x1, c1 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    with torch.no_grad():  # in place, this would raise "Inplace update to inference tensor outside InferenceMode"
        out = cached(x1, c1, *state, torch.tensor(1.0), torch.tensor(True))
    new_x_hat, new_res, _ = LAYOUT.split(out[2:-1])
    torch.testing.assert_close(new_x_hat[0], x1)
    torch.testing.assert_close(new_res[0][0], out[0] - x1)


def test_init_writes_into_the_previous_generations_state():
    from fastcache_compile.passes.block_state import recycling

    record, _ = _blocks()
    x0, c0 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    old = list(record(x0, c0, torch.tensor(0.0))[2:-1])
    storage = _ptrs(t for t in old if t.dim() > 0)
    x1, c1 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    with recycling(old):
        *outs, _ = record(x1, c1, torch.tensor(0.0))
    outs, state = outs[:2], outs[2:]
    tensors = [t for t in state if t.dim() > 0]
    assert _ptrs(tensors) == storage  # every state tensor reuses one of the old ones, none is new
    assert not _ptrs(tensors) & _ptrs([x1, c1, *outs])
    fresh = record(x1, c1, torch.tensor(0.0))[2:-1]  # no pool: fresh tensors, the same values
    assert all(torch.equal(a, b) for a, b in zip(state, fresh))


def test_a_new_generation_recycles_the_streams_state(built):
    model, case = built["dit"], CASES["dit"]
    cm = compile_eager(model, threshold=0.05)
    first = sample(cm, case, steps=3)
    slots = [s for o in owners_of_model(model) for p in o.parts.values() for s in p.slots.values()]
    before = [_ptrs(t for t in s.state if t.dim() > 0) for s in slots]
    again = sample(cm, case, steps=3)  # the timestep jumps back up: a new generation
    after = [_ptrs(t for t in s.state if t.dim() > 0) for s in slots]
    assert after == before  # no activation-sized state tensor was allocated anew
    assert torch.equal(again, first)
