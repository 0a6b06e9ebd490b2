"""Token selection and token merging in the ``fastcache`` backend (static-shape buckets, per sample)."""

import math
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import fastcache_compile as fc
from fastcache_compile.backend import _outlined
from fastcache_compile.passes.retarget import retarget, verify_by_tiling
from fastcache_compile.passes.select_tokens import (
    TokenInput,
    _capture_stack_args,
    _small_args,
    gather_rows,
    plan_tokens,
    split_stack,
)
from models import CASES, compile_eager, sample, split_inputs

NEVER_MOVES = 1e9  # token_threshold no token exceeds: every cached step takes the smallest bucket


@pytest.mark.parametrize("name", list(CASES))
def test_full_bucket_only_equals_block_cache_equals_uncached(built, name):
    model, case = built[name], CASES[name]
    ref = sample(model, case, steps=6)
    block_only = sample(compile_eager(model, threshold=0.0), case, steps=6)
    torch._dynamo.reset()
    cm = compile_eager(model, threshold=0.0, token_select=True, token_buckets=(1.0,))
    tokens_full = sample(cm, case, steps=6)
    assert torch.equal(block_only, ref)
    assert torch.equal(tokens_full, ref)
    st = fc.stats(cm)
    assert set(st["tokens_per_call"]) == {st["num_tokens"]}


@pytest.mark.parametrize("name", list(CASES))
def test_selection_runs_fewer_tokens_and_stays_close(built, name):
    model, case = built[name], CASES[name]
    ref = sample(model, case, steps=8)
    buckets = (0.25, 0.5, 0.75, 1.0)
    cm = compile_eager(model, threshold=0.0, token_select=True, token_buckets=buckets, token_threshold=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no refusal: every model family is supported
        out = sample(cm, case, steps=8)
    st = fc.stats(cm)
    n = st["num_tokens"]
    allowed = {max(1, math.ceil(f * n)) for f in buckets}
    assert set(st["tokens_per_call"]) <= allowed
    assert min(st["tokens_per_call"]) < n  # some step really ran a reduced bucket
    assert st["work_fraction"] < 1.0
    assert st["tokens_per_call"].get(n, 0) >= 2  # warm-up steps see every token
    err = float((out - ref).norm() / ref.norm())
    assert 0.0 < err < 0.3


def test_token_threshold_zero_selects_everything(built):
    model, case = built["dit"], CASES["dit"]
    ref = sample(model, case, steps=6)
    cm = compile_eager(model, threshold=0.0, token_select=True, token_threshold=0.0)
    assert torch.equal(sample(cm, case, steps=6), ref)


def test_no_recompiles_after_the_first_generation(built):
    model, case = built["dit"], CASES["dit"]
    torch._dynamo.reset()
    cm = compile_eager(model, threshold=0.05, token_select=True, token_threshold=0.1, token_merge=True)
    sample(cm, case, steps=8, seed=0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    variants = fc.stats(cm)["compiled_variants"]
    sample(cm, case, steps=8, seed=1)
    sample(cm, case, steps=8, seed=2)
    st = fc.stats(cm)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert st["compiled_variants"] == variants == 2  # init + one cached graph holding every bucket
    assert st["generations"] == 3 and sum(st["tokens_per_call"].values()) == 24  # {tokens: calls}
    assert len(set(st["tokens_per_call"])) > 1  # several buckets were taken without recompiling


@pytest.mark.parametrize("merge", [False, True])
def test_selection_is_per_sample(built, merge):
    """A sample's result does not depend on what else is in the batch (CFG halves, other prompts)."""
    model = built["dit"]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    labels = torch.tensor([1, 7])
    opts = dict(threshold=0.0, token_select=True, token_buckets=(0.5, 1.0), token_threshold=NEVER_MOVES)
    opts.update(token_merge=merge, merge_ratio=0.5)

    def run(xs, ys):
        torch._dynamo.reset()
        cm = compile_eager(model, **opts)
        with torch.no_grad():
            for t in (900, 700, 500, 300, 100):
                eps = cm(hidden_states=xs, timestep=torch.full((xs.shape[0],), t), class_labels=ys).sample
                xs = xs - 0.1 * eps[:, :4]
        return xs, fc.stats(cm)

    both, st = run(x, labels)
    alone, _ = run(x[:1], labels[:1])
    assert (4 if merge else 8) in st["tokens_per_call"]  # the half bucket ran (of 16 tokens)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


def test_merge_ratio_zero_is_selection_alone(built):
    model, case = built["pixart"], CASES["pixart"]
    opts = dict(threshold=0.0, token_select=True, token_threshold=0.1)
    plain = sample(compile_eager(model, **opts), case, steps=8)
    torch._dynamo.reset()
    merged = sample(compile_eager(model, **opts, token_merge=True, merge_ratio=0.0), case, steps=8)
    assert torch.equal(plain, merged)


def test_merging_runs_fewer_tokens_than_selection(built):
    model, case = built["sd3"], CASES["sd3"]
    opts = dict(threshold=0.0, token_select=True, token_threshold=NEVER_MOVES, token_buckets=(0.5, 1.0))
    cm = compile_eager(model, **opts, token_merge=True, merge_ratio=0.5)
    sample(cm, case, steps=6)
    assert set(fc.stats(cm)["tokens_per_call"]) == {16, 4}  # 8 selected tokens merged into 4 clusters


def test_merge_without_selection_merges_all_tokens(built):
    model, case = built["dit"], CASES["dit"]
    cm = compile_eager(model, threshold=0.0, token_merge=True, merge_ratio=0.25)
    out = sample(cm, case, steps=6)
    assert set(fc.stats(cm)["tokens_per_call"]) == {16, 12}
    ref = sample(model, case, steps=6)
    assert 0.0 < float((out - ref).norm() / ref.norm()) < 0.5


def _stack(model, case, x, cond):
    """The outlined, stack-split Dynamo graph of one call, the values entering its stack, its plan."""
    captured = {}

    def grab(gm, example_inputs):
        captured["gm"], captured["args"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    cm = torch.compile(model, backend=grab, fullgraph=True)
    with torch.no_grad():
        case.step_call(cm, x, case.to_timestep(0.5), cond)
    gm = split_stack(_outlined(captured["gm"], captured["args"]))
    stack_args = _capture_stack_args(gm, captured["args"])
    return gm, stack_args, plan_tokens(gm, stack_args)


def test_flux_rope_rows_are_shared_and_keep_the_text_rows(built):
    case = CASES["flux"]
    x, cond = split_inputs(case.make_inputs(2, torch.Generator().manual_seed(0)))
    _, _, plan = _stack(built["flux"], case, x, cond)
    # cos / sin of [5 text; 16 image] positions, without a batch axis: one token set per batch
    assert len(plan.token_inputs) == 2
    assert all(t.shared and t.offset == 5 and t.dim == 0 for t in plan.token_inputs.values())


def test_positional_rows_travel_with_the_tokens(built):
    """Wan on 3 latent frames, blocks run on the gathered frame-0 tokens, equals Wan on a 1-frame video."""
    model, case = built["wan"], CASES["wan"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)
    cond = {"encoder_hidden_states": torch.randn(2, 6, 16, generator=gen)}
    gm3, args3, plan3 = _stack(model, case, x, cond)
    gm1, args1, plan1 = _stack(model, case, x[:, :, :1], cond)
    assert len(plan3.token_inputs) == 2 and all(not t.shared and t.dim == 1 for t in plan3.token_inputs.values())
    k, n = plan1.num_tokens, plan3.num_tokens  # 16 tokens per frame, token order is frame-major
    small = _small_args(plan3, args3, k)  # the first k tokens and their RoPE rows
    for p, spec in plan3.token_inputs.items():
        assert torch.equal(small[p], args1[p].expand_as(small[p]))  # rows of frame 0 = a 1-frame video's table
        other = gather_rows(args3[p], torch.arange(k, 2 * k).expand(2, k), spec)
        assert not torch.equal(other, small[p])
    _, outs, _ = retarget(gm3.fastcache_stack_0, small, {n: k, 2 * n: 2 * k})
    one_frame = list(args1)
    one_frame[plan1.stream] = small[plan3.stream]
    with torch.no_grad():
        expected = gm1.fastcache_stack_0(*one_frame)[plan1.out]
    torch.testing.assert_close(outs[plan3.out], expected, rtol=1e-5, atol=1e-5)


def test_retargeting_is_checked_against_the_tiled_original(built):
    model, case = built["handwritten"], CASES["handwritten"]  # head dim 16 = token count 16
    x, cond = split_inputs(case.make_inputs(2, torch.Generator().manual_seed(0)))
    gm, stack_args, plan = _stack(model, case, x, cond)
    stack, n = gm.fastcache_stack_0, plan.num_tokens
    small = _small_args(plan, stack_args, n // 2)
    good, _, changes = retarget(stack, small, {n: n // 2, 2 * n: n})
    # reshape(B, N, 3, H, d) with N = d: only the token axis may change
    assert len(changes) >= 1
    run_full, run_good = (lambda a: list(stack(*a))), (lambda a: list(good(*a)))
    assert verify_by_tiling(run_full, run_good, stack_args, small, plan.stream, {}, plan.out, 2) < 1e-5


def test_gather_rows_layouts():
    rows = torch.tensor([[2, 0], [1, 3]])
    batch_first = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    got = gather_rows(batch_first, rows, TokenInput(dim=1, shared=False, offset=0))
    assert torch.equal(got[1, 0], batch_first[1, 1]) and torch.equal(got[0, 0], batch_first[0, 2])
    table = torch.arange(7 * 2).reshape(7, 2)  # 2 text rows, then 5 image rows
    got = gather_rows(table, rows, TokenInput(dim=0, shared=True, offset=2))
    assert torch.equal(got, table[[0, 1, 4, 2]])


class _BiasBlock(nn.Module):
    """Attention with a per-pair bias: a per-token input with two token axes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + bias, dim=-1)
        return x + self.out(attn @ v)


class _BiasModel(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.t_embed = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(_BiasBlock(dim) for _ in range(2))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.t_embed(timestep[:, None, None].float())
        for block in self.blocks:
            h = block(h, bias)
        return self.head(h)


def test_unsupported_per_token_input_is_refused_once_with_block_caching_kept():
    torch.manual_seed(0)
    model = _BiasModel().eval()
    x, bias = torch.randn(2, 12, 4), torch.randn(2, 12, 12)
    with torch.no_grad():
        ref = [model(x, torch.full((2,), t), bias) for t in (900, 500, 100)]
    torch._dynamo.reset()
    cm = compile_eager(model, threshold=0.0, token_select=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [cm(x, torch.full((2,), t), bias) for t in (900, 500, 100)]
    refusals = [w for w in caught if "token selection/merging not applied" in str(w.message)]
    assert len(refusals) == 1 and "several axes of token length" in str(refusals[0].message)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))
    assert "tokens_per_call" not in fc.stats(cm)


def test_inductor_matches_eager_lowering(built, tmp_path):
    model, case = built["dit"], CASES["dit"]
    calib = tmp_path / "dit.safetensors"
    fc.calibrate(model, lambda m: [sample(m, case, steps=6, seed=s) for s in (10, 11, 12)], calib)
    # fitted block maps in the full branch and W_s in the reduced ones, all traced inside torch.cond
    opts = dict(threshold=0.05, token_select=True, token_threshold=0.1, token_merge=True, calibration=str(calib))
    eager_cm = compile_eager(model, **opts)
    eager_out = sample(eager_cm, case, steps=6)
    eager_tokens = fc.stats(eager_cm)["tokens_per_call"]
    assert len(eager_tokens) == 3  # reduced stacks of two sizes and the full one ran
    torch._dynamo.reset()
    cm = torch.compile(model, backend="fastcache", options=opts, fullgraph=True)
    out = sample(cm, case, steps=6)
    assert fc.stats(cm)["tokens_per_call"] == eager_tokens
    torch.testing.assert_close(out, eager_out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "options",
    [
        {"token_buckets": ()},
        {"token_buckets": (0.0, 1.0)},
        {"token_buckets": (1.5,)},
        {"token_threshold": -1.0},
        {"token_merge": 1},
        {"merge_ratio": 1.0},
        {"merge_k": 0},
        {"merge_lambda": -0.5},
    ],
)
def test_bad_token_options_raise(options):
    with pytest.raises(ValueError):
        fc.FastCacheConfig.from_options(options)


def test_export_refuses_token_options(built):
    with pytest.raises(ValueError, match="block-level caching only"):
        fc.export_onnx(built["dit"], {}, "unused", token_select=True)


def test_token_fraction_counts_each_call_against_its_own_token_count(built):
    model = built["dit"]
    cm = compile_eager(model, threshold=0.0, token_select=True, token_threshold=0.0)  # every token runs
    with torch.no_grad():
        for side in (8, 16):  # 16 and 64 tokens: two graphs (or variants) with different N
            for t in (900, 600, 300):
                x = torch.randn(2, 4, side, side)  # every token moves
                cm(hidden_states=x, timestep=torch.full((2,), t), class_labels=torch.tensor([1, 2]))
    st = fc.stats(cm)
    assert sorted(set(st["tokens_per_call"])) == [16, 64]
    assert st["token_fraction"] == 1.0 and st["work_fraction"] == 1.0


def _cond_depths(gm: torch.fx.GraphModule, depth: int = 0) -> list[tuple[int, int]]:
    """(depth, conds directly in it) for every graph of a traced module: the top graph is depth 0, a
    cond branch one deeper than the graph holding the cond."""
    conds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond]
    out = [(depth, len(conds))]
    for node in conds:
        for branch in node.args[1:3]:
            out += _cond_depths(getattr(gm, branch.target), depth + 1)
    return out


def test_full_stack_sits_directly_under_one_cond(built, monkeypatch):
    # Each enclosing cond re-traces and fake-runs the per-block conds inside it; with the full stack at
    # the end of the bucket chain (three conds deep) token mode compiled ~2x slower than block caching.
    from torch.fx.experimental.proxy_tensor import make_fx

    import fastcache_compile.backend as backend

    model, case = built["dit"], CASES["dit"]
    seen, lower = [], backend._lower

    def grab(gm, args, lowering):
        if hasattr(getattr(gm, "fastcache_tokens", None), "full"):  # the cached variant, not the init one
            seen.append((gm, list(args)))
        return lower(gm, args, lowering)

    monkeypatch.setattr(backend, "_lower", grab)
    cm = compile_eager(model, threshold=0.05, token_select=True, token_threshold=0.1)
    sample(cm, case, steps=3)
    gm, args = seen[-1]
    blocks = sum(type(m).__name__ == "CachedBlock" for m in gm.fastcache_tokens.full.modules())
    assert len(gm.fastcache_tokens.branch_list) == 3 and blocks >= 2
    depths = _cond_depths(make_fx(gm, tracing_mode="fake")(*args))
    assert [d for d, n in depths if n == blocks] == [1]  # the full stack: a branch of the top cond
    assert max(d for d, _ in depths) == 3  # the bucket chain: outer cond, then two more for 3 buckets
