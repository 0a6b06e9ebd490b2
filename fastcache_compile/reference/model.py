"""Loading and sampling the reference MMDiT (flow matching, Euler, classifier-free guidance).

Every sample's initial noise comes from its own seed, so any method, batch size or batch order sees
identical noise per sample, and the Euler sampler adds none afterwards: outputs differ only where the
model calls differ.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

DEFAULT_PATH = Path(__file__).resolve().parent / "mmdit-fmnist"
NULL_ROW = 10  # row of the label encoder that holds the empty prompt (classifier-free guidance)
CfgMode = Literal["batch", "split"]


@dataclass
class Reference:
    """The reference transformer with its prompt tables, scheduler and default sampling settings."""

    transformer: torch.nn.Module
    tokens: torch.Tensor  # (11, T, joint_attention_dim): prompt tokens per class, row 10 empty
    pooled: torch.Tensor  # (11, pooled_projection_dim)
    scheduler: Any  # diffusers FlowMatchEulerDiscreteScheduler
    steps: int
    guidance: float
    path: Path


def load(path: str | Path = DEFAULT_PATH) -> Reference:
    """Load a reference model folder (``from_pretrained`` layout) in float32, eval mode, no grad."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from safetensors.torch import load_file

    path = Path(path)
    needed = ("config.json", "label_encoder.safetensors", "sampling.json", "scheduler/scheduler_config.json")
    missing = [name for name in needed if not (path / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a reference model folder (missing {', '.join(missing)}); train one with "
            "`python -m benchmarks.reference.train_mmdit --out DIR` or pass the folder that holds it"
        )
    model = SD3Transformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval().requires_grad_(False)
    tables = load_file(str(path / "label_encoder.safetensors"))
    if set(tables) != {"tokens", "pooled"}:
        raise ValueError(f"{path / 'label_encoder.safetensors'} must hold exactly 'tokens' and 'pooled'")
    sampling = json.loads((path / "sampling.json").read_text())
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    return Reference(
        model,
        tables["tokens"].float(),
        tables["pooled"].float(),
        sched,
        int(sampling["steps"]),
        float(sampling["guidance"]),
        path,
    )


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(N, *shape) standard normal noise, row i drawn from a generator seeded with ``seeds[i]``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _stream(model: Any, name: str, step: int, steps: int, t: torch.Tensor) -> contextlib.AbstractContextManager:
    # diffusers' cache hooks keep one state per ``cache_context`` name, as its pipelines call them;
    # a model without an enabled diffusers cache gets a no-op.
    if getattr(model, "is_cache_enabled", False):
        return model.cache_context(name, step_index=step, num_inference_steps=steps, timestep=t)
    return contextlib.nullcontext()


def _call(
    model: Any, ref: Reference, x: torch.Tensor, rows: torch.Tensor, t: torch.Tensor, stream: str, step: int, steps: int
) -> torch.Tensor:
    with _stream(model, stream, step, steps, t):
        out = model(
            hidden_states=x,
            encoder_hidden_states=ref.tokens[rows],
            pooled_projections=ref.pooled[rows],
            timestep=t.expand(x.shape[0]),
            return_dict=False,
        )
    return out[0]


@torch.no_grad()
def sample(
    ref: Reference,
    transformer: Any,
    labels: torch.Tensor | Sequence[int],
    seed: int | Sequence[int],
    steps: int | None = None,
    guidance: float | None = None,
    cfg: CfgMode = "batch",
) -> torch.Tensor:
    """Generate ``len(labels)`` images (N, 1, 32, 32) clamped to [-1, 1].

    ``transformer`` is ``ref.transformer`` or anything that calls like it (a ``torch.compile`` output, a
    cache wrapper). ``seed``: one int (sample i uses ``seed + i``) or one seed per label. ``cfg="batch"``
    runs ``[cond; uncond]`` as one batch of 2N; ``"split"`` makes two calls per step, cond first.
    ``guidance <= 1`` disables guidance. ``steps``/``guidance`` default to the model's ``sampling.json``.
    """
    if cfg not in ("batch", "split"):
        raise ValueError(f"cfg must be 'batch' or 'split', got {cfg!r}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= NULL_ROW):
        raise ValueError(f"labels must be class indices in [0, {NULL_ROW}), got {labels.tolist()}")
    n = labels.shape[0]
    steps = ref.steps if steps is None else int(steps)
    guidance = ref.guidance if guidance is None else float(guidance)
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} labels; pass one seed per label or a single int")
    cfg_conf = ref.transformer.config
    x = initial_noise(seeds, (cfg_conf.in_channels, cfg_conf.sample_size, cfg_conf.sample_size))  # (N, C, H, W)
    sched = ref.scheduler
    sched.set_timesteps(steps)
    null = torch.full_like(labels, NULL_ROW)
    for i, t in enumerate(sched.timesteps):
        t_now = t.reshape(1).float()  # (1,), broadcast to the batch in _call
        if guidance <= 1.0:
            v = _call(transformer, ref, x, labels, t_now, "cond", i, steps)
        elif cfg == "batch":
            out = _call(transformer, ref, torch.cat([x, x]), torch.cat([labels, null]), t_now, "batch", i, steps)
            cond, uncond = out.chunk(2)
            v = uncond + guidance * (cond - uncond)
        else:
            cond = _call(transformer, ref, x, labels, t_now, "cond", i, steps)
            uncond = _call(transformer, ref, x, null, t_now, "uncond", i, steps)
            v = uncond + guidance * (cond - uncond)
        x = sched.step(v, t, x).prev_sample
    return x.clamp(-1.0, 1.0)
