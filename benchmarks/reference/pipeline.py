"""Class-conditional DDIM sampling with classifier-free guidance for the reference DiT.

    from benchmarks.reference.pipeline import load_reference, sample
    model = load_reference()
    images = sample(model, torch.tensor([0, 3, 7]), seed=0)  # (3, 1, 32, 32) in [-1, 1]

A plain loop in the style of diffusers' ``DiTPipeline``. That pipeline itself cannot drive this model:
it requires an ``AutoencoderKL`` and always decodes ``latents / 0.18215`` through it (the reference model
works in pixel space), hard-codes ImageNet's null class 1000 (ours is 10), and draws the noise of the
whole batch from one generator, so a sample's noise would depend on its batch mates.

Here every sample's initial noise comes from its own seed, so any method, batch size or batch order
sees identical noise per sample, and DDIM with ``eta = 0`` adds none afterwards: outputs differ only
where the model calls differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

DEFAULT_PATH = Path(__file__).resolve().parent / "dit-fmnist"
NULL_CLASS = 10  # diffusers' LabelEmbedding puts the "no label" row after the 10 real classes
DEFAULT_GUIDANCE = 3.0
CfgMode = Literal["batch", "split"]


def load_reference(path: str | Path = DEFAULT_PATH) -> DiTTransformer2DModel:
    """The reference transformer in float32 and eval mode (stored as fp16 to keep the repo small)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no reference model at {path}: train it with "
            "`python -m benchmarks.reference.train_dit --out benchmarks/reference/dit-fmnist`"
        )
    model = DiTTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32)
    return model.eval().requires_grad_(False)


def load_scheduler(path: str | Path = DEFAULT_PATH) -> DDIMScheduler:
    return DDIMScheduler.from_pretrained(Path(path), subfolder="scheduler")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...] = (1, 32, 32)) -> torch.Tensor:
    """(N, *shape) standard normal noise, row i drawn from a generator seeded with ``seeds[i]``."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows)


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} labels; pass one seed per label or a single int")
    return seeds


def _stream(model: Any, name: str, step: int, steps: int, t: torch.Tensor) -> contextlib.AbstractContextManager:
    # diffusers' cache hooks keep one state per ``cache_context`` name, the way its pipelines call them
    # ("cond" / "uncond"); models without an enabled diffusers cache (or without CacheMixin) get a no-op.
    if getattr(model, "is_cache_enabled", False):
        return model.cache_context(name, step_index=step, num_inference_steps=steps, timestep=t)
    return contextlib.nullcontext()


def _call(
    model: Any, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, stream: str, step: int, steps: int
) -> torch.Tensor:
    with _stream(model, stream, step, steps, t):
        out = model(hidden_states=x, timestep=t.expand(x.shape[0]), class_labels=y, return_dict=False)
    return out[0]


@torch.no_grad()
def sample(
    transformer: Any,
    labels: torch.Tensor,
    seed: int | Sequence[int],
    steps: int = 50,
    guidance: float = DEFAULT_GUIDANCE,
    cfg: CfgMode = "batch",
    scheduler: DDIMScheduler | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """Generate ``len(labels)`` images (N, 1, 32, 32) clamped to [-1, 1].

    ``transformer`` is the eager model or anything that calls like it (``torch.compile`` output, a
    cache wrapper). ``seed`` is one int (sample i uses ``seed + i``) or one seed per label.
    ``cfg="batch"`` runs conditional and unconditional halves as one batch of 2N (one model call per
    step); ``cfg="split"`` makes two calls per step, conditional first, as some pipelines do.
    ``guidance <= 1`` disables classifier-free guidance (one conditional call per step).
    ``size`` overrides the trained resolution (sin-cos positions are recomputed for other sizes).
    """
    if cfg not in ("batch", "split"):
        raise ValueError(f"cfg must be 'batch' or 'split', got {cfg!r}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    n = labels.shape[0]
    config = transformer.config
    side = size or config.sample_size
    shape = (config.in_channels, side, side)
    x = initial_noise(_seeds(seed, n), shape)  # (N, C, H, W)
    sched = scheduler if scheduler is not None else load_scheduler()
    sched.set_timesteps(steps)
    null = torch.full_like(labels, NULL_CLASS)
    use_cfg = guidance > 1.0

    for i, t in enumerate(sched.timesteps):
        t_now = t.reshape(1).long()  # (1,), broadcast to the batch in _call
        if not use_cfg:
            eps = _call(transformer, x, labels, t_now, "cond", i, steps)
        elif cfg == "batch":
            both = torch.cat([x, x])  # (2N, C, H, W): conditional half first
            out = _call(transformer, both, torch.cat([labels, null]), t_now, "batch", i, steps)
            cond, uncond = out.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        else:
            cond = _call(transformer, x, labels, t_now, "cond", i, steps)
            uncond = _call(transformer, x, null, t_now, "uncond", i, steps)
            eps = uncond + guidance * (cond - uncond)
        x = sched.step(eps[:, : shape[0]], t, x).prev_sample
    return x.clamp(-1.0, 1.0)
