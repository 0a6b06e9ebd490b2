"""The comparison harness's peers and baselines on a tiny MMDiT (SD3Transformer2DModel), eager, random weights.

Expected counts are worked out by hand from each method's rule; equivalence tests use settings that
never skip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import baselines as bl
from benchmarks import diffusers_hooks as dhk
from benchmarks import step_caches as sc
from benchmarks.cachedit_runs import CacheDit
from fastcache_compile.reference import Reference, sample

STEPS = 6
LAYERS = 3


@pytest.fixture(scope="module")
def ref() -> Reference:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=8,
        in_channels=1,
        out_channels=1,
        num_layers=LAYERS,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=4,
    ).eval()
    tokens, pooled = torch.randn(11, 2, 16), torch.randn(11, 16)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return Reference(model, tokens, pooled, sched, STEPS, 3.0, Path("."))


def _run(ref: Reference, method: bl.Baseline, cfg: str = "batch") -> torch.Tensor:
    with method:
        method.clear_stats()
        return sample(ref, method.model, torch.tensor([0, 3]), seed=0, cfg=cfg)


@pytest.fixture(scope="module")
def plain(ref: Reference) -> torch.Tensor:
    return sample(ref, ref.transformer, torch.tensor([0, 3]), seed=0)


def test_block_family_pack_roundtrip(ref: Reference) -> None:
    fam = bl.block_family(ref.transformer)
    assert fam is bl.MMDIT
    enc, hid = torch.zeros(1), torch.ones(1)
    states = fam.unpack((enc, hid))  # the block returns (encoder, hidden); states are hidden first
    assert states[0] is hid and states[1] is enc
    assert fam.pack(states) == (enc, hid)


def test_fora_interval_one_is_uncached(ref: Reference, plain: torch.Tensor) -> None:
    fora = sc.Fora(ref.transformer, 1)
    out = _run(ref, fora)
    assert torch.equal(out, plain)
    assert fora.counter.block_skip_fraction() == 0.0


def test_fora_interval_two_skips_half_and_reuses_both_streams(ref: Reference, plain: torch.Tensor) -> None:
    fora = sc.Fora(ref.transformer, 2)
    out = _run(ref, fora)
    # 6 steps, one batched call each: steps 0, 2, 4 compute every block, steps 1, 3, 5 reuse them.
    assert fora.counter.calls == STEPS
    assert fora.counter.block_skip_fraction() == pytest.approx(0.5)
    assert not torch.equal(out, plain)
    # the residual of the prompt stream is cached too (None only from the last, context_pre_only block)
    (stream,) = fora.streams.values()
    assert stream.block_res[0][1] is not None and stream.block_res[LAYERS - 1][1] is None


def test_split_cfg_gets_one_state_per_stream(ref: Reference) -> None:
    fora = sc.Fora(ref.transformer, 2)
    _run(ref, fora, cfg="split")
    assert len(fora.streams) == 2  # cond and uncond calls of a step never share a cache
    assert fora.counter.block_skip_fraction() == pytest.approx(0.5)


def test_fbc_never_skipping_is_uncached(ref: Reference, plain: torch.Tensor) -> None:
    fbc = sc.FirstBlockCache(ref.transformer, 0.0)  # rel. change < 0 never holds
    assert torch.equal(_run(ref, fbc), plain)
    assert fbc.counter.block_skip_fraction() == 0.0


def test_teacache_runs_on_mmdit(ref: Reference) -> None:
    def gen(m: torch.nn.Module) -> None:
        sample(ref, m, torch.tensor([1, 2]), seed=100)

    fit = sc.fit_teacache(ref.transformer, gen, degree=2)
    assert fit["pairs"] == STEPS - 1  # consecutive step pairs of the one batched stream
    tea = sc.TeaCache(ref.transformer, 1e9, fit["coefficients"], STEPS, fit["input_change_range"])
    _run(ref, tea)
    # Huge threshold: only step 0 (nothing cached yet) and step 5 (the last) compute the stack.
    assert tea.counter.block_skip_fraction() == pytest.approx((STEPS - 2) / STEPS)


@pytest.mark.parametrize("order", [1, 2])
def test_diffusers_taylorseer_orders_forecast_attention(ref: Reference, plain: torch.Tensor, order: int) -> None:
    ts = dhk.taylorseer(ref.transformer, interval=2, order=order)
    assert ts.method == f"diffusers-taylorseer-o{order}" and ts.granularity == "attention"
    out = _run(ref, ts)
    assert ts.counter.block_skip_fraction() == 0.0  # feed-forwards always run
    assert 0.0 < ts.counter.attention_skip_fraction() < 1.0
    assert not torch.equal(out, plain)


def test_diffusers_taylorseer_on_whole_blocks(ref: Reference, plain: torch.Tensor) -> None:
    ids = dhk.whole_blocks(ref.transformer)
    # the last block is context_pre_only: it returns None for the text stream, which TaylorSeer cannot hold
    assert ids == [r"transformer_blocks\.(0|1)"]
    ts = dhk.taylorseer(ref.transformer, interval=2, order=1, identifiers=ids)
    assert ts.granularity == "block" and ts.setting == "interval=2 whole blocks"
    out = _run(ref, ts)
    assert 0.0 < ts.counter.block_skip_fraction() < 1.0
    assert not torch.equal(out, plain)


def test_taylorseer_orders_differ(ref: Reference) -> None:
    one = _run(ref, dhk.taylorseer(ref.transformer, interval=2, order=1))
    two = _run(ref, dhk.taylorseer(ref.transformer, interval=2, order=2))
    assert not torch.allclose(one, two)


def test_cachedit_zero_threshold_is_uncached(ref: Reference, plain: torch.Tensor) -> None:
    cd = CacheDit(ref.transformer, 1, 0, 0.0, STEPS)
    assert torch.allclose(_run(ref, cd), plain, atol=1e-5)
    assert cd.counter.block_skip_fraction() == 0.0


@pytest.mark.parametrize("order", [0, 1])
def test_cachedit_huge_threshold_skips_middle_blocks(ref: Reference, plain: torch.Tensor, order: int) -> None:
    cd = CacheDit(ref.transformer, 1, 1, 1e9, STEPS, taylorseer_order=order, warmup_steps=2)
    assert cd.method == ("cache-dit+taylorseer" if order else "cache-dit")
    first = _run(ref, cd)
    frac = cd.counter.block_skip_fraction()
    # F1B1 of 3 blocks: only block 1 can be skipped, on the steps after the 2 warm-up steps.
    assert frac == pytest.approx((STEPS - 2) / STEPS / LAYERS)
    assert not torch.equal(first, plain)
    # reset() refreshes cache-dit's context: a second generation repeats the first exactly
    cd.clear_stats()
    with cd:
        cd.reset()
        again = sample(ref, cd.model, torch.tensor([0, 3]), seed=0)
    assert torch.equal(again, first)


def test_cachedit_rejects_bad_split(ref: Reference) -> None:
    with pytest.raises(ValueError, match="Fn"):
        CacheDit(ref.transformer, 2, 2, 0.1, STEPS)  # 4 > 3 blocks


def test_fora_on_dit_family() -> None:
    # The same wrappers on the old reference's block family (hidden states only, tensor return).
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from benchmarks.reference.pipeline import sample as dit_sample

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        sample_size=32,
        patch_size=8,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    ).eval()
    sched = DDIMScheduler(num_train_timesteps=1000)
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        plain = dit_sample(dit, labels, 0, steps=4, scheduler=sched)
        assert bl.block_family(dit) is bl.DIT
        for interval, skipped in ((1, 0.0), (2, 0.5)):
            fora = sc.Fora(dit, interval)
            with fora:
                out = dit_sample(fora.model, labels, 0, steps=4, scheduler=sched)
            assert fora.counter.block_skip_fraction() == pytest.approx(skipped)
            assert torch.equal(out, plain) == (interval == 1)


def test_whole_blocks_covers_flux_single_stream_blocks() -> None:
    """Flux's single-stream blocks are whole blocks too: without them TaylorSeer would forecast only
    the dual-stream third of a Flux stack."""
    import diffusers.hooks as dh

    from models import _build_flux, _flux_inputs, split_inputs

    torch.manual_seed(0)
    flux = dhk.with_cache_mixin(_build_flux().eval().requires_grad_(False))
    ids = dhk.whole_blocks(flux)
    assert ids == [r"transformer_blocks\.(0|1)", r"single_transformer_blocks\.\d+"]
    config = dh.TaylorSeerCacheConfig(cache_interval=2, max_order=1, cache_identifiers=ids)
    flux.enable_cache(config)
    hooked = [n for n, m in flux.named_modules() if getattr(getattr(m, "_diffusers_hook", None), "hooks", None)]
    assert sorted(hooked) == [f"single_transformer_blocks.{i}" for i in (0, 1)] + [
        f"transformer_blocks.{i}" for i in (0, 1)
    ]
    x, cond = split_inputs(_flux_inputs(1, torch.Generator().manual_seed(0)))
    with torch.no_grad(), flux.cache_context("cond"):
        out = flux(hidden_states=x, **cond, timestep=torch.tensor([0.5]), return_dict=False)[0]
    assert torch.isfinite(out).all()
    flux.disable_cache()
