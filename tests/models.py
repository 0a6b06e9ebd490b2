"""Tiny random-weight DiT-family models and a sampling loop for exercising the caching backend.

Each :class:`ModelCase` bundles a model factory with the glue a diffusers pipeline would use to
drive it (input construction, the per-step call, the unconditional branch for CFG), so tests can
run the *same* denoising loop eagerly and through ``torch.compile`` and compare the results.

Conventions shared by every case:

* ``make_inputs(batch, generator)`` returns a flat dict: ``inputs[LATENTS]`` is the initial noise,
  every other key is a conditioning kwarg that ``step_call`` forwards to the model.
* The sampler walks a noise level ``sigma`` from 1.0 down to 0.0; ``to_timestep(sigma)`` turns it
  into the model's own 0-d timestep (DiT-style models: an integer in [0, 999]; SD3 / Wan: a float
  ``1000 * sigma``; Flux: ``sigma`` itself, it scales by 1000 internally). Timesteps therefore
  strictly decrease within one generation.
* ``step_call(model, latents, timestep, cond)`` expands the timestep to the batch, calls the model
  with keyword arguments (``return_dict=False`` where supported) and returns a prediction shaped
  like ``latents``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

LATENTS = "latents"  # key of the initial noise in the dict returned by ``ModelCase.make_inputs``
NUM_CLASSES = 10  # class-conditional models: labels 0..9, label 10 is the CFG "null" class
NULL_CLASS = NUM_CLASSES
WEIGHT_SEED = 0

Cond = dict[str, Any]
CfgMode = Literal["batch", "split"] | None


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[int, torch.Generator], Cond]
    step_call: Callable[[nn.Module, torch.Tensor, torch.Tensor, Cond], torch.Tensor]
    to_timestep: Callable[[float], torch.Tensor]
    # Conditioning of the unconditional CFG branch, built from the conditional one.
    make_uncond: Callable[[Cond], Cond]
    # Cond keys without a batch dimension (shared by both CFG halves, never concatenated).
    unbatched: frozenset[str] = field(default_factory=frozenset)


def split_inputs(inputs: Cond) -> tuple[torch.Tensor, Cond]:
    """Separate the initial latents from the conditioning kwargs."""
    cond = dict(inputs)
    return cond.pop(LATENTS), cond


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    # fork_rng keeps the fixed weight seed from clobbering the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        model = factory()
    return model.eval().requires_grad_(False)  # factories build in float32 already


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _labels(batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (batch,), generator=gen)


def _int_timestep(sigma: float) -> torch.Tensor:
    # DDPM-style models are trained on integer steps 0..999.
    return torch.tensor(round(999 * sigma), dtype=torch.long)


def _float_timestep(scale: float) -> Callable[[float], torch.Tensor]:
    def convert(sigma: float) -> torch.Tensor:
        return torch.tensor(scale * sigma, dtype=torch.float32)

    return convert


def _null_label(cond: Cond) -> Cond:
    return {**cond, "class_labels": torch.full_like(cond["class_labels"], NULL_CLASS)}


def _zero_text(*keys: str) -> Callable[[Cond], Cond]:
    # Stand-in for an empty negative prompt: zero text embeddings, everything else shared.
    def uncond(cond: Cond) -> Cond:
        return {**cond, **{k: torch.zeros_like(cond[k]) for k in keys}}

    return uncond


def _expand(t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    # Pipelines broadcast the scalar step timestep over the (possibly CFG-doubled) batch.
    return t.expand(latents.shape[0])


# --------------------------------------------------------------------------- diffusers DiT


def _build_dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,  # diffusers appends the null-class row itself
        norm_num_groups=1,
    )


def _dit_inputs(batch: int, gen: torch.Generator) -> Cond:
    return {LATENTS: _randn(gen, batch, 4, 8, 8), "class_labels": _labels(batch, gen)}


def _dit_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return model(hidden_states=x, timestep=_expand(t, x), **cond, return_dict=False)[0]


# --------------------------------------------------------------------------- PixArt


PIXART_OUT_CHANNELS = 8  # learned-sigma head, as in the released PixArt checkpoints


def _build_pixart() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=PIXART_OUT_CHANNELS,
        num_layers=2,
        cross_attention_dim=32,  # must equal the inner dim: captions are projected to it
        sample_size=8,
        patch_size=2,
        caption_channels=24,
        use_additional_conditions=False,
        interpolation_scale=1,
    )


def _pixart_inputs(batch: int, gen: torch.Generator) -> Cond:
    tokens = 6
    mask = torch.ones(batch, tokens)
    mask[:, -2:] = 0  # padded prompt tokens, so the cross-attention mask path is exercised
    return {
        LATENTS: _randn(gen, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(gen, batch, tokens, 24),
        "encoder_attention_mask": mask,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _pixart_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    out = model(hidden_states=x, timestep=_expand(t, x), **cond, return_dict=False)[0]
    # The pipeline drops the predicted variance half of a learned-sigma output.
    return out.chunk(2, dim=1)[0]


# --------------------------------------------------------------------------- SD3


def _build_sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=32,  # must equal the inner dim (heads * head_dim)
        pooled_projection_dim=16,
        pos_embed_max_size=8,
        # SD3.5 flavour: one dual-attention block and RMS qk-norm cover the extra code paths.
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _sd3_inputs(batch: int, gen: torch.Generator) -> Cond:
    return {
        LATENTS: _randn(gen, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(gen, batch, 7, 24),
        "pooled_projections": _randn(gen, batch, 16),
    }


def _sd3_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return model(hidden_states=x, timestep=_expand(t, x), **cond, return_dict=False)[0]


# --------------------------------------------------------------------------- Flux

FLUX_GRID = 4  # 8x8 latent, 2x2-packed -> 4x4 image tokens of 16 channels
FLUX_TXT_TOKENS = 5  # deliberately != image token count


def _build_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=16,
        guidance_embeds=False,  # schnell-style: no guidance embedding, guidance=None
        axes_dims_rope=(4, 6, 6),  # must sum to attention_head_dim
    )


def _flux_inputs(batch: int, gen: torch.Generator) -> Cond:
    rows, cols = torch.meshgrid(torch.arange(FLUX_GRID), torch.arange(FLUX_GRID), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return {
        LATENTS: _randn(gen, batch, FLUX_GRID * FLUX_GRID, 16),
        "encoder_hidden_states": _randn(gen, batch, FLUX_TXT_TOKENS, 24),
        "pooled_projections": _randn(gen, batch, 16),
        # 2-D ids (no batch dim), as current Flux pipelines pass them.
        "img_ids": img_ids,
        "txt_ids": torch.zeros(FLUX_TXT_TOKENS, 3),
    }


def _flux_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return model(hidden_states=x, timestep=_expand(t, x), guidance=None, **cond, return_dict=False)[0]


# --------------------------------------------------------------------------- Wan (video)


def _build_wan() -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rope splits it into t/h/w parts; 12 is the smallest clean split
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )


def _wan_inputs(batch: int, gen: torch.Generator) -> Cond:
    return {
        LATENTS: _randn(gen, batch, 4, 3, 8, 8),  # (B, C, F, H, W): 3 latent frames
        "encoder_hidden_states": _randn(gen, batch, 6, 16),
    }


def _wan_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return model(hidden_states=x, timestep=_expand(t, x), **cond, return_dict=False)[0]


# --------------------------------------------------------------------------- hand-written DiT


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly integer) timesteps, as in the DiT reference code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, shape (grid * grid, dim)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        out = pos[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TinyDiTBlock(nn.Module):
    """adaLN-Zero block: modulated self-attention then modulated MLP, each gated."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class TinyDiTFinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class TinyDiT(nn.Module):
    """DiT-paper-style class-conditional transformer (Peebles & Xie), without the zero init.

    The reference zero-initialises the adaLN modulation and final layer, which would make an
    untrained model output exactly zero; default PyTorch init keeps every block's residual live.
    """

    def __init__(
        self,
        input_size: int = 8,
        patch: int = 2,
        in_channels: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        num_classes: int = NUM_CLASSES,
        freq_dim: int = 32,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.out_channels = in_channels
        self.grid = input_size // patch
        self.freq_dim = freq_dim
        self.x_embedder = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid)[None], persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(num_classes + 1, dim)  # last row: null class for CFG
        self.blocks = nn.ModuleList(TinyDiTBlock(dim, heads) for _ in range(depth))
        self.final_layer = TinyDiTFinalLayer(dim, patch, self.out_channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g, c = x.shape[0], self.patch, self.grid, self.out_channels
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(timestep_embedding(t, self.freq_dim)) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def _tiny_inputs(batch: int, gen: torch.Generator) -> Cond:
    return {LATENTS: _randn(gen, batch, 4, 8, 8), "y": _labels(batch, gen)}


def _tiny_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return model(x=x, t=_expand(t, x), **cond)


def _tiny_uncond(cond: Cond) -> Cond:
    return {**cond, "y": torch.full_like(cond["y"], NULL_CLASS)}


# --------------------------------------------------------------------------- registry

CASES: dict[str, ModelCase] = {
    case.name: case
    for case in (
        ModelCase("dit", lambda: _build(_build_dit), _dit_inputs, _dit_step, _int_timestep, _null_label),
        ModelCase(
            "pixart",
            lambda: _build(_build_pixart),
            _pixart_inputs,
            _pixart_step,
            _int_timestep,
            _zero_text("encoder_hidden_states"),
        ),
        ModelCase(
            "sd3",
            lambda: _build(_build_sd3),
            _sd3_inputs,
            _sd3_step,
            _float_timestep(1000.0),  # SD3 pipelines pass 1000 * sigma
            _zero_text("encoder_hidden_states", "pooled_projections"),
        ),
        ModelCase(
            "flux",
            lambda: _build(_build_flux),
            _flux_inputs,
            _flux_step,
            _float_timestep(1.0),  # Flux multiplies the timestep by 1000 itself
            _zero_text("encoder_hidden_states", "pooled_projections"),
            unbatched=frozenset({"img_ids", "txt_ids"}),
        ),
        ModelCase(
            "wan",
            lambda: _build(_build_wan),
            _wan_inputs,
            _wan_step,
            _float_timestep(1000.0),
            _zero_text("encoder_hidden_states"),
        ),
        ModelCase("handwritten", lambda: _build(TinyDiT), _tiny_inputs, _tiny_step, _int_timestep, _tiny_uncond),
    )
}


# --------------------------------------------------------------------------- sampling


def _concat_cond(cond: Cond, uncond: Cond, unbatched: frozenset[str]) -> Cond:
    """Stack the two CFG branches along the batch dim, as pipelines do for batched CFG."""
    out: Cond = {}
    for key, a in cond.items():
        b = uncond[key]
        if key in unbatched or a is None:
            out[key] = a
        elif isinstance(a, torch.Tensor):
            out[key] = torch.cat([a, b])
        elif isinstance(a, dict):
            out[key] = _concat_cond(a, b, unbatched)
        else:
            raise TypeError(f"cannot batch cond entry {key!r} of type {type(a).__name__}")
    return out


def sigmas(steps: int) -> list[float]:
    """Noise levels 1.0 -> 0.0 (``steps + 1`` values); the model is called at all but the last."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def sample(
    model: nn.Module,
    case: ModelCase,
    batch: int = 2,
    steps: int = 6,
    seed: int = 0,
    cfg: CfgMode = "batch",
    guidance: float = 3.0,
) -> torch.Tensor:
    """Deterministic Euler loop ``x += (sigma_next - sigma) * pred``; returns the final latents.

    cfg="batch": one call per step on [cond; uncond] (2 * batch rows); cfg="split": two calls per
    step (cond, then uncond); None: one conditional call per step.
    """
    if cfg not in ("batch", "split", None):
        raise ValueError(f"unknown cfg mode {cfg!r}")
    x, cond = split_inputs(case.make_inputs(batch, torch.Generator().manual_seed(seed)))
    uncond = case.make_uncond(cond) if cfg else cond
    both = _concat_cond(cond, uncond, case.unbatched) if cfg == "batch" else cond
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas(steps)):
            t = case.to_timestep(sigma)
            if cfg is None:
                pred = case.step_call(model, x, t, cond)
            else:
                if cfg == "batch":
                    pred_cond, pred_uncond = case.step_call(model, torch.cat([x, x]), t, both).chunk(2)
                else:
                    pred_cond = case.step_call(model, x, t, cond)
                    pred_uncond = case.step_call(model, x, t, uncond)
                pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            x = x + (sigma_next - sigma) * pred
    return x


def compile_eager(model: nn.Module, **options: Any) -> nn.Module:
    """``torch.compile`` with the fastcache backend, eager lowering (fast to build), one full graph."""
    return torch.compile(model, backend="fastcache", options={"lowering": "eager", **options}, fullgraph=True)
