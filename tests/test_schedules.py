"""Generations and steps: either schedule direction, unnamed timesteps, split graphs, stream limits."""

import warnings

import pytest
import torch
from torch import nn

import fastcache_compile as fc
import fastcache_compile.runtime as runtime_mod
from fastcache_compile.schedule import Schedule
from models import TinyDiT, compile_eager


def _walk(schedule: Schedule, calls: list[tuple[str, float | None]]) -> list[tuple[int, int]]:
    return [schedule.observe(stream.encode(), t) for stream, t in calls]


# -- the schedule by hand ----------------------------------------------------------------------------
def test_decreasing_then_jump_up_starts_the_next_generation():
    got = _walk(Schedule(), [("c", 900), ("c", 800), ("c", 700), ("c", 900), ("c", 800)])
    assert got == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]


def test_increasing_schedule_learns_its_direction():
    got = _walk(Schedule(), [("c", 0.0), ("c", 0.25), ("c", 0.5), ("c", 0.75), ("c", 0.0), ("c", 0.25)])
    assert got == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]


def test_split_cfg_streams_share_a_step_and_a_generation():
    calls = [("c", 900), ("u", 900), ("c", 800), ("u", 800), ("c", 900), ("u", 900)]
    assert _walk(Schedule(), calls) == [(1, 0), (1, 0), (1, 1), (1, 1), (2, 0), (2, 0)]


def test_one_step_generations_are_each_counted():
    assert _walk(Schedule(), [("c", 999)] * 4) == [(1, 0), (2, 0), (3, 0), (4, 0)]


def test_heun_repeated_timestep_is_a_step_not_a_generation():
    got = _walk(Schedule(), [("c", 900), ("c", 800), ("c", 800), ("c", 700), ("c", 700)])
    assert got == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]


def test_num_steps_ends_a_generation_after_its_last_step():
    # a run stopped after 2 of 3 steps, then one that starts below where it stopped
    got = _walk(Schedule(num_steps=3), [("c", 900), ("c", 800), ("c", 700), ("c", 600), ("c", 500), ("c", 400)])
    assert got == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    got = _walk(Schedule(num_steps=2), [("c", 900), ("u", 900), ("c", 800), ("u", 800), ("c", 700), ("u", 700)])
    assert got == [(1, 0), (1, 0), (1, 1), (1, 1), (2, 0), (2, 0)]
    assert _walk(Schedule(), [("c", 900), ("c", 800), ("c", 700)])[-1] == (1, 2)


def test_without_timestep_a_repeated_stream_advances_the_step():
    got = _walk(Schedule(), [("c", None), ("u", None), ("c", None), ("u", None)])
    assert got == [(1, 0), (1, 0), (1, 1), (1, 1)]


# -- through the backend -----------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, t):
        return x + torch.tanh(self.lin(x)) * t.reshape(-1, 1, 1)


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def run(self, x, t):
        for b in self.blocks:
            x = b(x, t)
        return x


class _Timestep(_Stack):
    def forward(self, x, timestep):
        return self.run(x, timestep)


class _CNoise(_Stack):
    def forward(self, x, c_noise):  # a time input under a name the runtime does not know
        return self.run(x, c_noise)


class _Sigma(_Stack):
    def forward(self, x, sigma_t, guidance):  # ... beside a constant per-sample float
        return self.run(x, sigma_t) * guidance.reshape(-1, 1, 1)


def _build(cls):
    torch.manual_seed(0)
    return cls().eval().requires_grad_(False)


def _run(cm, ts, *extra, x=None):
    x = torch.randn(2, 5, 8) if x is None else x
    with torch.no_grad():
        for t in ts:
            cm(x, torch.full((2,), float(t)), *extra)


def test_increasing_schedule_through_the_backend_skips():
    cm = compile_eager(_build(_Timestep), threshold=10.0, warmup_steps=1)
    ts = [i / 10 for i in range(1, 11)]  # flow time 0.1 -> 1.0
    _run(cm, ts)
    _run(cm, ts)
    st = fc.stats(cm)
    assert st["generations"] == 2 and st["calls"] == 20
    assert st["blocks_skipped"] == 2 * 9 * 2  # every step after the first of each generation


@pytest.mark.parametrize("cls", [_CNoise, _Sigma])
def test_unnamed_timestep_found_by_role(cls):
    runtime_mod._warned.clear()
    cm = compile_eager(_build(cls), threshold=10.0, warmup_steps=1)
    extra = (torch.full((2,), 3.0),) if cls is _Sigma else ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(cm, [900, 800, 700, 600], *extra)
        _run(cm, [900, 800, 700, 600], *extra)
    assert not [w for w in caught if "fastcache" in str(w.message)]
    st = fc.stats(cm)
    assert st["generations"] == 2
    # The second call recognised the time input (and recomputed, its stream key changed); the first
    # generation's last two steps and the second's last three skipped.
    assert st["per_block_skipped"] == [5, 5]


def test_no_timestep_at_all_says_so_once():
    runtime_mod._warned.clear()

    class NoTime(_Stack):
        def forward(self, x, text):  # text: (B, L, D) conditioning, nothing per-sample and scalar
            return self.run(x + text, torch.ones(x.shape[0]))

    cm = compile_eager(_build(NoTime), threshold=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for _ in range(3):
                cm(torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    msgs = [str(w.message) for w in caught if "no timestep input recognised" in str(w.message)]
    assert len(msgs) == 1 and "reset(model)" in msgs[0]


def test_generations_count_pipeline_runs_not_streams():
    cm = compile_eager(TinyDiT(depth=2).eval().requires_grad_(False), threshold=0.0)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for _ in range(2):  # two generations of split-call CFG
            for t in (900, 600, 300):
                cm(x, torch.tensor([t]), torch.tensor([1]))
                cm(x, torch.tensor([t]), torch.tensor([10]))
        for _ in range(4):  # four back-to-back 1-step generations
            cm(x, torch.tensor([999]), torch.tensor([1]))
    st = fc.stats(cm)
    assert st["calls"] == 16 and st["generations"] == 6


def test_generation_split_over_two_graphs_counts_steps_once():
    """A non-contiguous first latent gives Dynamo a second graph for the later steps; warm-up and
    the forced last step still follow the generation."""
    model = TinyDiT(depth=3).eval().requires_grad_(False)
    cm = compile_eager(model, threshold=10.0, warmup_steps=2, num_steps=8)
    y = torch.tensor([1])
    x = torch.randn(1, 8, 8, 4).permute(0, 3, 1, 2)  # (B, C, H, W) view of channels-last noise
    per_step = []
    with torch.no_grad():
        for i, t in enumerate(range(8, 0, -1)):
            before = fc.stats(cm)["blocks_computed"] if i else 0
            x = (x + 0.01 * cm(x, torch.tensor([100 * t]), y)).contiguous()  # from the second step on
            per_step.append(fc.stats(cm)["blocks_computed"] - before)
    assert fc.stats(cm)["graphs"] == 2
    assert per_step == [3, 3, 0, 0, 0, 0, 0, 3]
    assert fc.stats(cm)["generations"] == 1


def test_more_streams_than_slots_warns_once():
    runtime_mod._warned.clear()
    cm = compile_eager(TinyDiT(depth=2).eval().requires_grad_(False), threshold=10.0, max_streams=2)
    x = torch.randn(1, 4, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            for t in (900, 800, 700):
                for label in (1, 2, 3):  # three streams per step, two slots
                    cm(x, torch.tensor([t]), torch.tensor([label]))
    msgs = [str(w.message) for w in caught if "max_streams=2" in str(w.message)]
    assert len(msgs) == 1 and "raise options['max_streams']" in msgs[0]
    assert fc.stats(cm)["blocks_skipped"] == 0


# -- refresh policies ---------------------------------------------------------------------------------
STEPS_10 = [1000 - 100 * i for i in range(10)]  # one generation of 10 steps


@pytest.mark.parametrize("every", [2, 3, 4])
def test_refresh_every_computes_all_blocks_on_schedule(every):
    cm = compile_eager(_build(_Timestep), threshold=10.0, warmup_steps=1, refresh_every=every)  # τ: always skip
    _run(cm, STEPS_10)
    refreshed = sum(1 for step in range(10) if step % every == 0)  # step 0 is the warm-up step too
    assert fc.stats(cm)["per_block_skipped"] == [10 - refreshed] * 2


@pytest.mark.parametrize(
    ("steps", "every", "computed"),
    [((0, 3), None, {0, 3}), ((2, 7, 8), None, {0, 2, 7, 8}), ([9, 4, 4], None, {0, 4, 9}), ((2,), 4, {0, 2, 4, 8})],
)
def test_refresh_steps_compute_all_blocks_at_those_steps(steps, every, computed):
    cm = compile_eager(_build(_Timestep), threshold=10.0, warmup_steps=1, refresh_steps=steps, refresh_every=every)
    _run(cm, STEPS_10)
    assert fc.stats(cm)["per_block_skipped"] == [10 - len(computed)] * 2
    # a new generation follows the same schedule (the steps count from its first call)
    _run(cm, STEPS_10)
    assert fc.stats(cm)["per_block_skipped"] == [2 * (10 - len(computed))] * 2


def test_a_run_after_a_complete_one_is_a_new_generation_with_num_steps():
    """A 10-step run, then one whose first timestep continues the first's direction: with
    ``num_steps`` the second is a generation of its own, computed at its warm-up and last step."""
    cm = compile_eager(_build(_Timestep), threshold=10.0, warmup_steps=1, num_steps=10)
    _run(cm, STEPS_10)
    _run(cm, [50 - 5 * i for i in range(10)])  # from 50 down: below the first run's last timestep
    st = fc.stats(cm)
    assert st["generations"] == 2
    assert st["per_block_skipped"] == [2 * 8] * 2  # per generation: step 0 and step 9 computed


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_max_skips_caps_consecutive_skips_per_block(cap):
    cm = compile_eager(_build(_Timestep), threshold=10.0, warmup_steps=1, max_skips=cap)
    _run(cm, STEPS_10)
    computes = len(range(0, 10, cap + 1))  # computed at 0, then after every `cap` skipped steps
    assert fc.stats(cm)["per_block_skipped"] == [10 - computes] * 2


def test_refresh_options_are_validated():
    with pytest.raises(ValueError, match="refresh_every must be None or an int >= 1"):
        fc.FastCacheConfig(refresh_every=0)
    for bad in ((-1, 4), "0,5", (1.5,), (True,), 5):
        with pytest.raises(ValueError, match="refresh_steps must be None or a tuple of step indices"):
            fc.FastCacheConfig(refresh_steps=bad)
    assert fc.FastCacheConfig(refresh_steps=[9, 0, 4, 4]).refresh_steps == (0, 4, 9)
    with pytest.raises(ValueError, match=r"never reaches \(steps are 0\.\.4\)"):
        fc.FastCacheConfig(refresh_steps=(3, 7), num_steps=5)
    assert fc.FastCacheConfig(refresh_steps=(3, 4), num_steps=5).refresh_steps == (3, 4)
    with pytest.raises(ValueError, match="max_skips is applied inside the cond graph"):
        fc.FastCacheConfig(max_skips=2, lowering="segments")
