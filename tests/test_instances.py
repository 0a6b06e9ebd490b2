"""Cache state belongs to one model instance under one compile, and never outlives it."""

import gc
import warnings
import weakref

import pytest
import torch

import fastcache_compile as fc
import fastcache_compile.runtime as runtime_mod
from fastcache_compile.instances import _OWNERS
from models import CASES, TinyDiT, compile_eager, sample


def _tiny(seed: int) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT(depth=3).eval().requires_grad_(False)


def _steps(cm, x, y, ts=(900, 800, 700)):
    with torch.no_grad():
        return [cm(x, torch.tensor([t]), y) for t in ts]


def _part(model):
    """The one owner of ``model`` (instance × compile) and its state in the one graph."""
    params = list(model.parameters())
    (owner,) = [o for o in _OWNERS.values() if any(o.ref() is p for p in params)]
    (part,) = owner.parts.values()
    return owner, part


X, Y = torch.randn(1, 4, 8, 8), torch.tensor([1])


def test_second_instance_is_not_served_from_the_first_ones_cache():
    a, b = _tiny(0), _tiny(1)
    ca = compile_eager(a, threshold=10.0, warmup_steps=1)
    cb = compile_eager(b, threshold=10.0, warmup_steps=1)
    _steps(ca, X, Y)
    out_b = _steps(cb, X, Y)  # Dynamo reuses a's graph for b
    with torch.no_grad():
        ref_b = b(X, torch.tensor([900]), Y)
    torch.testing.assert_close(out_b[0], ref_b, rtol=0, atol=0)  # b's first call computes everything
    sa, sb = fc.stats(ca), fc.stats(cb)
    assert sa["calls"] == sb["calls"] == 3 and sa["generations"] == sb["generations"] == 1
    assert sb["per_block_skipped"] == [2, 2, 2]
    fc.reset(cb)
    assert fc.stats(cb)["calls"] == 0 and fc.stats(ca)["calls"] == 3  # reset clears b only
    # after b's reset a continues its generation from its own state
    with torch.no_grad():
        before = fc.stats(ca)["blocks_computed"]
        ca(X, torch.tensor([600]), Y)
    assert fc.stats(ca)["blocks_computed"] == before


def test_same_module_compiled_twice_with_different_options():
    model = _tiny(0)
    skip = compile_eager(model, threshold=10.0, warmup_steps=1)
    exact = compile_eager(model, threshold=0.0)
    _steps(skip, X, Y)
    _steps(exact, X, Y)
    _steps(exact, X, Y, ts=(900, 800))
    s_skip, s_exact = fc.stats(skip), fc.stats(exact)
    assert (s_skip["calls"], s_skip["blocks_skipped"], s_skip["generations"]) == (3, 6, 1)
    assert (s_exact["calls"], s_exact["blocks_skipped"], s_exact["generations"]) == (5, 0, 2)
    with pytest.raises(ValueError, match="compiled with fastcache 2 times"):
        fc.stats(model)
    fc.reset(exact)
    assert fc.stats(exact)["calls"] == 0 and fc.stats(skip)["calls"] == 3
    fc.reset(model)  # the original module: every compile of it
    assert fc.stats(skip)["calls"] == 0


def test_state_does_not_outlive_the_model():
    model = _tiny(0)
    cm = compile_eager(model, threshold=10.0, warmup_steps=1)
    _steps(cm, X, Y)
    owner, part = _part(model)
    alive = [weakref.ref(owner), weakref.ref(model.x_embedder.weight)]
    alive += [weakref.ref(s) for slot in part.slots.values() for s in slot.state]
    del model, cm, owner, part
    gc.collect()
    assert all(r() is None for r in alive)
    # a new model (possibly at a reused address) starts clean: its first call computes everything
    fresh = _tiny(2)
    cf = compile_eager(fresh, threshold=10.0, warmup_steps=1)
    _steps(cf, X, Y, ts=(800,))
    assert fc.stats(cf)["blocks_skipped"] == 0 and fc.stats(cf)["calls"] == 1


def test_parameters_requiring_grad_run_the_plain_graph():
    runtime_mod._warned.clear()
    torch.manual_seed(0)
    model = TinyDiT(depth=2).eval()  # parameters require grad (a model in training)
    cm = compile_eager(model, threshold=10.0, warmup_steps=0)
    t = torch.tensor([900])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cm(X, t, Y)
        cm(X, t, Y)
    assert out.grad_fn is not None
    msgs = [str(w.message) for w in caught if "require grad" in str(w.message)]
    assert len(msgs) == 1 and "torch.no_grad()" in msgs[0]
    out.square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(X, t, Y).square().sum().backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_token_statistics_stay_bounded():
    model = _tiny(0)
    cm = compile_eager(model, threshold=10.0, warmup_steps=1, token_select=True, token_threshold=0.0)
    for _ in range(3):
        _steps(cm, X, Y, ts=(900, 800, 700, 600))
    st = fc.stats(cm)
    _, part = _part(model)
    # running sums only: nothing grows with the number of calls
    assert not any(isinstance(v, list) for v in vars(part.stats).values())
    assert isinstance(st["tokens_per_call"], dict) and sum(st["tokens_per_call"].values()) == st["calls"] == 12
    assert set(st["tokens_per_call"]) <= {4, 8, 12, 16} and st["num_tokens"] == 16


FLUX_OPTIONS = {"lowering": "eager", "threshold": 0.5, "warmup_steps": 1}


def _flux():
    from diffusers import FirstBlockCacheConfig

    case = CASES["flux"]
    return case, case.build(), FirstBlockCacheConfig(threshold=0.2)


def _sample_in_context(model, cm, case):
    with model.cache_context("cond"):
        return sample(cm, case, cfg=None, batch=1, steps=3)


def test_diffusers_cache_enabled_before_compile_is_refused():
    case, model, fbc = _flux()
    model.enable_cache(fbc)
    cm = torch.compile(model, backend="fastcache", options=FLUX_OPTIONS)
    with pytest.raises(ValueError, match=r"diffusers cache is enabled.*disable_cache\(\)"):
        _sample_in_context(model, cm, case)
    with pytest.raises(ValueError, match="FirstBlockCacheConfig"):
        fc.stats(cm)
    model.disable_cache()  # the advice works: the model runs again
    out = sample(cm, case, cfg=None, batch=1, steps=3)
    assert torch.isfinite(out).all()


def test_diffusers_cache_enabled_after_compile_is_refused():
    case, model, fbc = _flux()
    cm = torch.compile(model, backend="fastcache", options=FLUX_OPTIONS)
    sample(cm, case, cfg=None, batch=1, steps=3)
    assert fc.stats(cm)["calls"] == 3
    model.enable_cache(fbc)
    with pytest.raises(ValueError, match="diffusers cache is enabled"):
        _sample_in_context(model, cm, case)
    with pytest.raises(ValueError, match="diffusers cache is enabled"):
        fc.stats(cm)  # never the stale numbers of before


def test_concurrent_generations_in_threads_keep_their_own_caches():
    """Two threads share one compiled model (a pipeline per thread, one transformer) with the same
    prompt and take turns step by step: each gets what it gets alone. Before, both landed in one
    schedule and one stream slot, so each skipped on the other's cached residuals."""
    import threading

    cm = compile_eager(_tiny(0), threshold=10.0, warmup_steps=1)  # every step after the first skips
    ts = (900, 800, 700, 600)
    xs = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    alone = []
    for x in xs:
        fc.reset(cm)
        alone.append(_steps(cm, x, Y, ts))
    fc.reset(cm)
    turns = [threading.Semaphore(1), threading.Semaphore(0)]
    got: list[list[torch.Tensor]] = [[], []]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for t in ts:
                turns[i].acquire()
                try:
                    with torch.no_grad():
                        got[i].append(cm(xs[i], torch.tensor([t]), Y))
                finally:
                    turns[1 - i].release()
        except BaseException as err:  # surfaced below: a thread's exception would otherwise be lost
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and all(len(g) == len(ts) for g in got)
    for mine, ref in zip(got, alone):
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    st = fc.stats(cm)  # the compile's statistics sum the threads'
    assert st["calls"] == 8 and st["generations"] == 2 and st["per_block_skipped"] == [6, 6, 6]
