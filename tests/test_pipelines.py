"""Real diffusers pipelines from tiny random components, with ``pipe.transformer`` compiled by fastcache.

Offline: no hub, no tokenizers. Prompts enter as precomputed embeddings (every pipeline here accepts
``prompt_embeds`` / ``negative_prompt_embeds``), so the text encoders are never called. Per pipeline:

* τ = 0 reproduces the uncompiled pipeline,
* τ > 0 skips blocks and stays close to it,
* a second ``pipe()`` call gives the same output (no state leaks from one generation into the next),
* ``stats(pipe.transformer)`` counts steps × calls per step and one generation per ``pipe()`` call.

Batched CFG (DiT, PixArt, SD3) calls the transformer once per step; split CFG (Flux true CFG, Wan)
twice, as two conditioning streams; Wan 2.2 hands the low-noise steps to ``transformer_2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import fastcache_compile

pytest.importorskip("diffusers")

STEPS = 4


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Two levels: vae_scale_factor 2, so a 16×16 image is an 8×8 latent of 4 channels.
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def _flow_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


# --------------------------------------------------------------------------- pipelines


def _dit() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,  # learned sigma, as the released DiT; the pipeline drops the variance half
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,  # the pipeline's null class is label 1000
        norm_num_groups=1,
    )
    pipe = DiTPipeline(transformer=transformer, vae=_vae(), scheduler=DDIMScheduler())
    return pipe, {"class_labels": [1, 7], "guidance_scale": 4.0, "output_type": "pt"}


def _pixart() -> tuple[Any, dict[str, Any]]:
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=8,
        patch_size=2,
        caption_channels=24,
        use_additional_conditions=False,
        interpolation_scale=1,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer, scheduler=DDIMScheduler()
    )
    mask = torch.ones(1, 6)
    mask[:, -2:] = 0  # padded prompt tokens: the cross-attention mask path runs
    kwargs = {
        "prompt_embeds": _randn(1, 6, 24, seed=1),
        "prompt_attention_mask": mask,
        "negative_prompt": None,  # defaults to "", which would need the tokenizer
        "negative_prompt_embeds": _randn(1, 6, 24, seed=2),
        "negative_prompt_attention_mask": mask,
        "guidance_scale": 4.0,
        "height": 16,
        "width": 16,
        "use_resolution_binning": False,
        "output_type": "latent",
    }
    return pipe, kwargs


def _sd3() -> tuple[Any, dict[str, Any]]:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        pos_embed_max_size=8,
    )
    none = dict.fromkeys(f"{kind}{n}" for kind in ("text_encoder", "tokenizer") for n in ("", "_2", "_3"))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=_flow_scheduler(), vae=_vae(), **none)
    kwargs = {
        "prompt_embeds": _randn(1, 7, 24, seed=1),
        "negative_prompt_embeds": _randn(1, 7, 24, seed=2),
        "pooled_prompt_embeds": _randn(1, 16, seed=3),
        "negative_pooled_prompt_embeds": _randn(1, 16, seed=4),
        "guidance_scale": 4.0,
        "height": 16,
        "width": 16,
        "output_type": "latent",
    }
    return pipe, kwargs


def _flux() -> tuple[Any, dict[str, Any]]:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, 2×2-packed
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    none = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    pipe = FluxPipeline(transformer=transformer, scheduler=_flow_scheduler(), vae=_vae(), **none)
    kwargs = {  # true CFG: cond and uncond are separate transformer calls (split CFG)
        "prompt_embeds": _randn(1, 5, 24, seed=1),
        "pooled_prompt_embeds": _randn(1, 16, seed=2),
        "negative_prompt_embeds": _randn(1, 5, 24, seed=3),
        "negative_pooled_prompt_embeds": _randn(1, 16, seed=4),
        "true_cfg_scale": 3.0,
        "height": 16,
        "width": 16,
        "output_type": "latent",
    }
    return pipe, kwargs


def _wan_transformer() -> Any:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )


def _wan_pipe(**stages: Any) -> tuple[Any, dict[str, Any]]:
    from diffusers import WanPipeline

    # No VAE: the scale factors default to Wan's (4 temporal, 8 spatial), so 5 frames of 32×32 are
    # 2 latent frames of 4×4; the output stays latent.
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_flow_scheduler(), **stages)
    kwargs = {
        "prompt_embeds": _randn(1, 6, 16, seed=1),
        "negative_prompt_embeds": _randn(1, 6, 16, seed=2),
        "guidance_scale": 3.0,
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "output_type": "latent",
    }
    return pipe, kwargs


def _wan() -> tuple[Any, dict[str, Any]]:
    return _wan_pipe(transformer=_wan_transformer())


def _wan22() -> tuple[Any, dict[str, Any]]:
    first = _wan_transformer()
    torch.manual_seed(1)
    second = _wan_transformer()
    # Boundary t = 500: of 6 steps (t = 1000, 800, 600, 401, 201, 1) each stage runs three.
    return _wan_pipe(transformer=first, transformer_2=second, boundary_ratio=0.5)


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[Any, dict[str, Any]]]
    calls_per_step: int  # transformer calls per denoising step: 1 for batched CFG, 2 for split CFG
    stage_steps: dict[str, int]  # denoising steps each transformer of the pipeline runs per pipe() call
    tau: float = 0.5  # large enough that a random tiny transformer skips within 3–4 steps

    @property
    def steps(self) -> int:
        return sum(self.stage_steps.values())


CASES = {
    "dit": Case(_dit, 1, {"transformer": STEPS}, tau=1.0),
    "pixart_sigma": Case(_pixart, 1, {"transformer": STEPS}),
    "sd3": Case(_sd3, 1, {"transformer": STEPS}),
    "flux": Case(_flux, 2, {"transformer": STEPS}),
    "wan": Case(_wan, 2, {"transformer": STEPS}),
    "wan22": Case(_wan22, 2, {"transformer": 3, "transformer_2": 3}),
}
WARMUP = 1  # of 3–4 steps per stage, the default 2 warm-up steps would leave little to skip


def _stats(module: torch.nn.Module) -> dict[str, Any] | Exception:
    # Kept as a value so that one stage's missing state fails only the tests that read it.
    try:
        return fastcache_compile.stats(module)
    except Exception as err:
        return err


def _runs(name: str) -> dict[str, Any]:
    """Everything the tests assert on, for one pipeline: outputs and stats of the three settings."""
    case = CASES[name]
    torch.manual_seed(0)
    pipe, kwargs = case.build()
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them: DiT drops class labels in training mode

    def generate() -> torch.Tensor:
        return pipe(num_inference_steps=case.steps, generator=_gen(), **kwargs)[0]

    originals = {stage: getattr(pipe, stage) for stage in case.stage_steps}
    runs: dict[str, Any] = {"uncompiled": generate()}
    settings = (("tau0", {"threshold": 0.0}, 1), ("tau", {"threshold": case.tau, "warmup_steps": WARMUP}, 2))
    for tag, options, calls in settings:
        torch._dynamo.reset()
        for stage, module in originals.items():
            setattr(pipe, stage, torch.compile(module, backend="fastcache", options={"lowering": "eager", **options}))
        runs[tag] = [generate() for _ in range(calls)]
        runs[tag + "_stats"] = {stage: _stats(getattr(pipe, stage)) for stage in originals}
    for stage, module in originals.items():
        setattr(pipe, stage, module)
    torch._dynamo.reset()
    return runs


_CACHE: dict[str, dict[str, Any]] = {}


@pytest.fixture
def runs(request: pytest.FixtureRequest) -> dict[str, Any]:
    # One build and three settings per pipeline, shared by the tests below (each compile costs seconds).
    name = request.node.callspec.params["name"]
    if name not in _CACHE:
        _CACHE[name] = _runs(name)
    return _CACHE[name]


def _stage_stats(runs: dict[str, Any], tag: str, stage: str) -> dict[str, Any]:
    s = runs[tag + "_stats"][stage]
    if isinstance(s, Exception):
        raise s
    return s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(CASES))
def test_exact_at_tau0(name, runs):
    torch.testing.assert_close(runs["tau0"][0], runs["uncompiled"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_stats_at_tau0(name, runs):
    case = CASES[name]
    for stage, steps in case.stage_steps.items():
        s = _stage_stats(runs, "tau0", stage)
        assert s["calls"] == steps * case.calls_per_step, stage
        assert s["generations"] == 1, stage
        assert s["blocks_skipped"] == 0, stage
        assert s["blocks_computed"] > 0, stage


@pytest.mark.parametrize("name", list(CASES))
def test_skips_and_stays_close(name, runs):
    for stage in CASES[name].stage_steps:
        assert _stage_stats(runs, "tau", stage)["blocks_skipped"] > 0, stage
    assert _rel(runs["tau"][0], runs["uncompiled"]) < 0.15


@pytest.mark.parametrize("name", list(CASES))
def test_second_call_reproduces(name, runs):
    first, second = runs["tau"]
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_stats_count_both_generations(name, runs):
    case = CASES[name]
    for stage, steps in case.stage_steps.items():
        s = _stage_stats(runs, "tau", stage)
        assert s["calls"] == 2 * steps * case.calls_per_step, stage
        assert s["generations"] == 2, stage
