"""Identical blocks share one compiled body (``passes/share_blocks.py``)."""

import pytest
import torch
from torch import fx

import fastcache_compile as fc
import fastcache_compile.backend as backend
from fastcache_compile.passes.block_state import _BlockBase, _tracing
from fastcache_compile.passes.share_blocks import SharedBlock, share_repeated_blocks, signature, unshare
from models import CASES, compile_eager, sample


def _graphs_to_lower(monkeypatch, model, case, **options):
    """The graphs the backend hands to its lowering (init and cached), with an example call each."""
    seen: list[tuple[fx.GraphModule, list]] = []
    lower = backend._lower

    def recording(gm, example_inputs, lowering):
        seen.append((gm, list(example_inputs)))
        return lower(gm, example_inputs, lowering)

    monkeypatch.setattr(backend, "_lower", recording)
    sample(compile_eager(model, **options), case, steps=4)
    return seen


def _blocks(gm: fx.GraphModule) -> list[torch.nn.Module]:
    return [m.block for m in gm.modules() if isinstance(m, _BlockBase)]


def test_uniform_stack_shares_one_body_and_computes_the_same(built, monkeypatch):
    model, case = built["handwritten"], CASES["handwritten"]
    for gm, example in _graphs_to_lower(monkeypatch, model, case, threshold=0.3):
        n_blocks = len(_blocks(gm))
        with torch.no_grad():
            before = gm(*example)
        assert len(share_repeated_blocks(gm)) == n_blocks > 1
        bodies = {b.graph_module for b in _blocks(gm)}
        assert all(isinstance(b, SharedBlock) for b in _blocks(gm)) and len(bodies) == 1
        with torch.no_grad():  # eagerly a shared block runs its body: same outputs, same state
            after = gm(*example)
        assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_reduced_stacks_get_their_own_bodies(built, monkeypatch):
    # token selection: the full stack and each re-specialised stack (other token counts) group apart
    model, case = built["dit"], CASES["dit"]
    seen = _graphs_to_lower(monkeypatch, model, case, threshold=0.05, token_select=True)
    gm = seen[-1][0]
    tokens = gm.get_submodule("fastcache_tokens")
    n_reduced = len(tokens.reduced)
    assert n_reduced >= 2
    share_repeated_blocks(gm)
    identifiers = {m.identifier for m in gm.modules() if isinstance(m, SharedBlock)}
    assert len(identifiers) == n_reduced + 1
    for stack in tokens.reduced.values():
        shared = [m for m in stack.modules() if isinstance(m, SharedBlock)]
        assert len({m.identifier for m in shared}) == 1 and len(shared) > 1


def test_signature_tells_blocks_apart():
    def trace(fn, *shapes):
        gm = fx.symbolic_trace(fn)
        for ph, shape in zip([n for n in gm.graph.nodes if n.op == "placeholder"], shapes):
            ph.meta["val"] = torch.empty(shape)
        return gm

    def block(x, w):
        return x + torch.tanh(x @ w)

    def other(x, w):
        return x + torch.sigmoid(x @ w)

    a, b = trace(block, (2, 4), (4, 4)), trace(block, (2, 4), (4, 4))
    assert signature(a) == signature(b)
    assert signature(a) != signature(trace(block, (3, 4), (4, 4)))  # another token count
    assert signature(a) != signature(trace(other, (2, 4), (4, 4)))  # another op

    class WithConstant(torch.nn.Module):  # a tensor attribute is not an input: its value may differ
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.ones(4))

        def forward(self, x):
            return x + self.c

    assert signature(trace(WithConstant(), (2, 4))) is None


def test_inductor_lowers_the_shared_body(built, monkeypatch):
    from torch._functorch import config as aot_config
    from torch._inductor import config, ir

    # a warm FX graph or AOT cache would skip lowering altogether
    no_cache = config.patch(fx_graph_cache=False)
    no_aot_cache = aot_config.patch(enable_autograd_cache=False)
    created = []
    create = ir.InvokeSubgraph.create.__func__

    def counting(cls, subgraph, *operands):
        created.append(subgraph.name)
        return create(cls, subgraph, *operands)

    monkeypatch.setattr(ir.InvokeSubgraph, "create", classmethod(counting))
    model, case = built["handwritten"], CASES["handwritten"]
    eager_cm = compile_eager(model, threshold=0.3)
    eager_out = sample(eager_cm, case, steps=6)
    eager_skips = fc.stats(eager_cm)["per_block_skipped"]
    torch._dynamo.reset()
    cm = torch.compile(model, backend="fastcache", options={"threshold": 0.3}, fullgraph=True)
    with no_cache, no_aot_cache:
        out = sample(cm, case, steps=6)
    assert created, "no block reached Inductor as a shared invoke_subgraph body"
    assert fc.stats(cm)["per_block_skipped"] == eager_skips and sum(eager_skips) > 0
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)


def test_unshare_restores_every_block(built, monkeypatch):
    model, case = built["handwritten"], CASES["handwritten"]
    gm = _graphs_to_lower(monkeypatch, model, case, threshold=0.3)[-1][0]
    before = _blocks(gm)
    unshare(share_repeated_blocks(gm))
    assert _blocks(gm) == before and not any(isinstance(m, SharedBlock) for m in gm.modules())


def test_a_failed_shared_lowering_warns_once_and_compiles_block_by_block(built, monkeypatch):
    from torch._functorch import config as aot_config
    from torch._inductor import config

    # cached artifacts of an earlier test would skip the tracing that fails here
    no_cache = config.patch(fx_graph_cache=False)
    no_aot_cache = aot_config.patch(enable_autograd_cache=False)

    def unsupported(self, *args):
        if _tracing(args):
            raise NotImplementedError("shared bodies unsupported here")
        return self.graph_module(*args)

    monkeypatch.setattr(SharedBlock, "forward", unsupported)
    backend._warned.clear()
    model, case = built["handwritten"], CASES["handwritten"]
    ref = sample(model, case, cfg=None, steps=4)
    with no_cache, no_aot_cache, pytest.warns(UserWarning, match="could not lower the shared block bodies") as caught:
        cm = torch.compile(model, backend="fastcache", options={"threshold": 0.0}, fullgraph=True)
        out = sample(cm, case, cfg=None, steps=4)
    assert sum("shared block bodies" in str(w.message) for w in caught) == 1  # init and cached: one message
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
