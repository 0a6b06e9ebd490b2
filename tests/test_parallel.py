"""fastcache under diffusers context parallelism (Ulysses), 2 gloo ranks on CPU.

Every rank holds a sequence shard; the skip test must see all shards or ranks diverge and deadlock
in a block's all-to-all (the collective timeout below turns that into a fast failure). One forked
2-rank job runs every distributed case; the tests compare its per-rank results with single-process
runs of the same model, inputs and options.
"""

from __future__ import annotations

import datetime
import itertools
import operator
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import fx

import fastcache_compile
from fastcache_compile.passes import reduce_stats
from fastcache_compile.passes.select_tokens import TokenPlanError, insert_token_select
from models import CASES, sigmas, split_inputs

WORLD = 2
STEPS = 6
TAU = 0.15
OPTS = {"lowering": "eager", "threshold": TAU, "warmup_steps": 1}
# Flux's CP plan splits the text tokens as well: they must divide by the degree (tests/models.py uses 5).
FLUX_TXT = 6
CP_CASES = ("flux", "wan")


def _inputs(name: str) -> tuple[torch.Tensor, dict]:
    """Latents whose shards move differently: the second half of the sequence (rank 1's shard) is
    scaled, so per-shard statistics differ and unreduced decisions would diverge between ranks."""
    x, cond = split_inputs(CASES[name].make_inputs(1, torch.Generator().manual_seed(3)))
    if name == "flux":
        x[:, x.shape[1] // 2 :] *= 4.0  # (B, N, C): tokens N/2.. live on rank 1
    else:
        x[:, :, 2:] *= 4.0  # (B, C, F, H, W): the last frame's tokens live on rank 1
    return x, cond


def _euler(model, name: str, cond_override: dict | None = None) -> torch.Tensor:
    case = CASES[name]
    x, cond = _inputs(name)
    cond = cond_override or cond
    with torch.no_grad():
        for sigma, nxt in itertools.pairwise(sigmas(STEPS)):
            x = x + (nxt - sigma) * case.step_call(model, x, case.to_timestep(sigma), cond)
    return x


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="fastcache", options={**OPTS, **options}, fullgraph=True)


def _run_cached(model, name: str, **options) -> tuple[torch.Tensor, list[int], int]:
    cm = _compiled(model, **options)
    out = _euler(cm, name)
    st = fastcache_compile.stats(cm)
    return out, st["per_block_skipped"], st["generations"]


# -- the distributed job -----------------------------------------------------------------------------
def _uneven_reduction(rank: int) -> dict:
    """δ² of a sharded stream split 3 / 5 tokens plus a replicated one, reduced over both ranks."""
    gen = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 8, 4, generator=gen), torch.randn(1, 8, 4, generator=gen)
    txt, txt_ref = torch.randn(1, 2, 4, generator=gen), torch.randn(1, 2, 4, generator=gen)
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    group = dist.group.WORLD.group_name
    red = reduce_stats.GroupStats(group, (True, False), 0)
    got = red.relative_change([x[:, rows], txt], [ref[:, rows], txt_ref])
    from fastcache_compile import rule

    return {"uneven": float(got), "uneven_expected": float(rule.relative_change([x, txt], [ref, txt_ref]))}


def _cold_wan_error(cp) -> str:
    """A cold Wan under CP without prepare_context_parallel: diffusers' hooks break the fullgraph trace
    (it fails before any collective, so both ranks fail alike and nothing hangs)."""
    model = CASES["wan"].build()
    model.enable_parallelism(config=cp)
    try:
        _run_cached(model, "wan")
    except Exception as e:  # Dynamo's Unsupported, wrapped differently across torch versions
        return type(e).__name__ + ": " + str(e).split("\n")[0]
    return ""


def _init(rank: int, port: int, timeout_s: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A divergence shows as a collective timeout; keep it short so the test fails instead of hanging.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=timeout_s))
    # diffusers 0.42 computes ``rank % torch.accelerator.device_count()``, which is 0 on a CPU-only host.
    torch.accelerator.device_count = lambda: 1


def _worker(rank: int, port: int, out_dir: str, calib_path: str) -> None:
    _init(rank, port, 60)
    from diffusers import ContextParallelConfig

    res: dict = _uneven_reduction(rank)
    cp = ContextParallelConfig(ulysses_degree=WORLD)
    res["wan_cold_error"] = _cold_wan_error(cp)  # before prepare_context_parallel registers anything
    for name in CP_CASES:
        model = CASES[name].build()
        model.enable_parallelism(config=cp)
        res[f"{name}_prepared"] = fastcache_compile.prepare_context_parallel(model)
        res[f"{name}_out"], res[f"{name}_skips"], res[f"{name}_gens"] = _run_cached(model, name)
        if name == "flux":
            res["flux_tau0"] = _run_cached(model, name, threshold=0.0)[0]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out, skips, _ = _run_cached(
                    model, name, calibration=calib_path, approximation="trajectory", token_select=True
                )
            res["calib_out"], res["calib_skips"] = out, skips
            res["token_warnings"] = [str(w.message) for w in caught if "token selection" in str(w.message)]
    # CFG-parallel: no CP in the model; rank 0 runs the conditional batch, rank 1 the unconditional.
    name = "flux"
    _, cond = _inputs(name)
    branch = cond if rank == 0 else CASES[name].make_uncond(cond)
    cm = _compiled(CASES[name].build())
    res["cfg_pred"] = _euler(cm, name, cond_override=branch)
    res["cfg_skips"] = fastcache_compile.stats(cm)["per_block_skipped"]
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _inductor_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port, 300)  # Inductor compiles each rank's graph before the first collective
    # A forked child inherits the parent's Inductor compile thread pool without its threads (torch's
    # after-fork hook clears only the process pool): once an earlier test compiled with Inductor, the
    # first C++ kernel here would wait forever. Compile in this thread instead.
    from torch._inductor import async_compile
    from torch._inductor import config as inductor_config

    async_compile.AsyncCompile.pool.cache_clear()
    inductor_config.compile_threads = 1
    from diffusers import ContextParallelConfig

    model = CASES["flux"].build()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    fastcache_compile.prepare_context_parallel(model)
    out, skips, _ = _run_cached(model, "flux", lowering="inductor")
    torch.save({"out": out, "skips": skips}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flux_txt():
    import models

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(models, "FLUX_TXT_TOKENS", FLUX_TXT)
        yield


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory, flux_txt) -> str:
    """A calibration fitted in one process (no parallelism) on the Flux case."""
    path = str(tmp_path_factory.mktemp("calib") / "flux.safetensors")
    fastcache_compile.calibrate(CASES["flux"].build(), lambda m: [_euler(m, "flux") for _ in range(2)], path)
    torch._dynamo.reset()
    return path


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, flux_txt, calib_path) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    # fork: the ranks inherit the imported torch/diffusers instead of importing them again.
    mp.start_processes(_worker, args=(_free_port(), out_dir, calib_path), nprocs=WORLD, start_method="fork")
    torch._dynamo.reset()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(flux_txt, calib_path) -> dict:
    """The same runs in one process: the compiled reference and the uncached model."""
    ref: dict = {}
    for name in CP_CASES:
        model = CASES[name].build()
        ref[f"{name}_out"], ref[f"{name}_skips"], _ = _run_cached(model, name)
        ref[f"{name}_plain"] = _euler(model, name)
    ref["calib_out"], ref["calib_skips"], _ = _run_cached(
        CASES["flux"].build(), "flux", calibration=calib_path, approximation="trajectory"
    )
    torch._dynamo.reset()
    return ref


# -- tests -------------------------------------------------------------------------------------------
def test_uneven_shards_reduce_exactly(ranks):
    for res in ranks:
        assert res["uneven"] == pytest.approx(res["uneven_expected"], rel=1e-6)


@pytest.mark.parametrize("name", CP_CASES)
def test_context_parallel_matches_single_process(ranks, single, name):
    skips = [res[f"{name}_skips"] for res in ranks]
    assert skips[0] == skips[1] == single[f"{name}_skips"]
    assert 0 < sum(skips[0]) < STEPS * len(skips[0])  # some blocks skipped, not all: the test decides
    for res in ranks:
        torch.testing.assert_close(res[f"{name}_out"], single[f"{name}_out"], atol=1e-5, rtol=0)
        assert res[f"{name}_gens"] == 1  # step / generation logic sees the replicated timestep


@pytest.mark.slow  # ~75 s on 2 cores: Inductor compiles the cached graph on both ranks
def test_context_parallel_under_inductor(tmp_path, flux_txt, single):
    mp.start_processes(_inductor_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="fork")
    torch._dynamo.reset()
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["skips"] == single["flux_skips"]
        torch.testing.assert_close(res["out"], single["flux_out"], atol=1e-4, rtol=0)


def test_wan_needs_prepare_for_a_cold_fullgraph_compile(ranks):
    for res in ranks:
        assert "Unsupported" in res["wan_cold_error"] or "logging" in res["wan_cold_error"], res["wan_cold_error"]
        assert res["wan_prepared"] > 0 and res["flux_prepared"] > 0


def test_prepare_without_parallelism_changes_nothing():
    model = CASES["wan"].build()
    assert fastcache_compile.prepare_context_parallel(model) == 0


def test_tau_zero_equals_uncached(ranks, single):
    for res in ranks:
        torch.testing.assert_close(res["flux_tau0"], single["flux_plain"], atol=1e-5, rtol=0)


def test_single_process_calibration_loads_and_tokens_refused_once(ranks, single):
    for res in ranks:
        assert res["calib_skips"] == single["calib_skips"]
        torch.testing.assert_close(res["calib_out"], single["calib_out"], atol=1e-5, rtol=0)
        assert len(res["token_warnings"]) == 1 and "context parallel" in res["token_warnings"][0]


def test_cfg_parallel_per_stream_state(ranks, single):
    """Each rank's branch equals the same branch run in one process with both streams interleaved."""
    name = "flux"
    _, cond = _inputs(name)
    model = _compiled(CASES[name].build())
    case = CASES[name]
    x_c, x_u = _inputs(name)[0], _inputs(name)[0]
    with torch.no_grad():
        for sigma, nxt in itertools.pairwise(sigmas(STEPS)):
            t = case.to_timestep(sigma)
            pc = case.step_call(model, x_c, t, cond)
            pu = case.step_call(model, x_u, t, case.make_uncond(cond))
            x_c, x_u = x_c + (nxt - sigma) * pc, x_u + (nxt - sigma) * pu
    torch.testing.assert_close(ranks[0]["cfg_pred"], x_c, atol=1e-5, rtol=0)
    torch.testing.assert_close(ranks[1]["cfg_pred"], x_u, atol=1e-5, rtol=0)
    both = fastcache_compile.stats(model)["per_block_skipped"]
    assert [a + b for a, b in zip(ranks[0]["cfg_skips"], ranks[1]["cfg_skips"])] == both
    assert sum(both) > 0  # something was served from a stream's cache


# -- graph analysis (no processes) -------------------------------------------------------------------
def _toy_graph(gather: bool) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    g = fx.Graph()
    x, txt = g.placeholder("x"), g.placeholder("txt")
    pieces = g.call_method("chunk", (x, 2), {"dim": 1})
    shard = g.call_function(operator.getitem, (pieces, 1))
    y = g.call_function(torch.add, (shard, txt))
    nodes = {"x": x, "txt": txt, "shard": shard, "y": y}
    if gather:
        ag = g.call_function(torch.ops._c10d_functional.all_gather_into_tensor.default, (y, 2, "7"))
        nodes["gathered"] = g.call_function(torch.ops._c10d_functional.wait_tensor.default, (ag,))
        nodes["after"] = g.call_function(torch.mul, (nodes["gathered"], 2.0))
    g.output(y)
    return fx.GraphModule(torch.nn.Module(), g), nodes


def test_sharded_values_follow_the_split_and_stop_at_a_gather():
    gm, n = _toy_graph(gather=True)
    sharded = reduce_stats.sharded_values(gm, world=2, rank=1)
    assert {n["shard"], n["y"]} <= sharded
    assert not {n["x"], n["txt"], n["gathered"], n["after"]} & sharded
    # Another rank's piece (or another split count) is not this rank's shard.
    assert n["shard"] not in reduce_stats.sharded_values(gm, world=2, rank=0)
    assert not reduce_stats.sharded_values(gm, world=3, rank=1)


def test_collective_group_is_read_from_the_graph():
    assert reduce_stats.collective_group(_toy_graph(gather=False)[0]) is None
    assert reduce_stats.collective_group(_toy_graph(gather=True)[0]) == "7"
    gm, n = _toy_graph(gather=True)
    with gm.graph.inserting_after(n["after"]):
        gm.graph.call_function(torch.ops._c10d_functional.all_reduce.default, (n["after"], "sum", "8"))
    with pytest.raises(reduce_stats.ParallelPlanError, match="several process groups"):
        reduce_stats.collective_group(gm)


def test_token_selection_refused_under_collectives():
    gm, _ = _toy_graph(gather=True)
    with pytest.raises(TokenPlanError, match="context parallel"):
        insert_token_select(
            gm,
            [torch.zeros(1, 4, 2), torch.zeros(1, 2, 2)],
            **dict(tau=0.1, alpha=0.05, form="reuse", params=None, buckets=(0.5, 1.0), select=True),
            **dict(token_threshold=0.1, merge=False, merge_ratio=0.5, merge_k=4, merge_lambda=1.0),
        )
