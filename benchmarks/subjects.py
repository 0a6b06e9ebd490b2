"""The models the comparison runs on, as data: how to load, sample and probe each one.

    new  the reference MMDiT (diffusers ``SD3Transformer2DModel``): rectified flow, Euler, CFG 3, 20 steps
         by default (``fastcache_compile.reference``). The primary model: it is sampled the way SD3 and
         Flux are, which is what users cache.
    old  the earlier reference DiT (``DiTTransformer2DModel``): ε-prediction, DDIM, CFG 3, 50 steps. Kept
         as a labelled hard case: its sampling collapses under almost any reuse.

Each model is loaded once per process (a checkpoint rewritten by a running training job cannot change
mid-sweep). Every sample's noise comes from its own seed, so all methods see the same noise per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.reference import pipeline as dit_pipeline
from fastcache_compile import reference as mmdit

MODELS = ("new", "old")


@dataclass
class Subject:
    """One reference model in the harness."""

    name: str  # "new" or "old"
    title: str  # for table headings
    regime: str  # objective / sampler / guidance, in words
    transformer: torch.nn.Module
    path: Path
    steps: int  # default sampling steps
    guidance: float
    calibration: Path  # where a shipped fastcache calibration for the default steps lives
    _generate: Callable[..., torch.Tensor]
    _inputs: Callable[[int], dict[str, Any]]

    def generate(
        self, transformer: Any, labels: torch.Tensor, seeds: list[int], steps: int, guidance: float, cfg: str
    ) -> torch.Tensor:
        """(N, 1, 32, 32) images in [-1, 1] from ``transformer`` (or anything that calls like it)."""
        return self._generate(transformer, labels, seeds, steps, guidance, cfg)

    def inputs(self, batch: int) -> dict[str, Any]:
        """Keyword inputs of one representative forward of ``batch`` rows (cond and uncond mixed)."""
        return self._inputs(batch)


def _new(path: Path | None) -> Subject:
    ref = mmdit.load(path or mmdit.DEFAULT_PATH)

    def generate(tr: Any, labels: Tensor, seeds: list[int], steps: int, guidance: float, cfg: str) -> Tensor:
        return mmdit.sample(ref, tr, labels, seeds, steps=steps, guidance=guidance, cfg=cfg)  # type: ignore[arg-type]

    def inputs(b: int) -> dict[str, Any]:
        rows = torch.arange(b) % (mmdit.NULL_ROW + 1)  # classes and the empty prompt
        size = ref.transformer.config.sample_size
        return {
            "hidden_states": torch.randn(b, 1, size, size, generator=torch.Generator().manual_seed(0)),
            "encoder_hidden_states": ref.tokens[rows],
            "pooled_projections": ref.pooled[rows],
            "timestep": torch.full((b,), 500.0),
        }

    return Subject(
        "new",
        "reference MMDiT (SD3Transformer2DModel, Fashion-MNIST)",
        "rectified flow, FlowMatchEuler, CFG",
        ref.transformer,
        ref.path,
        ref.steps,
        ref.guidance,
        ref.path / "fastcache_calibration.safetensors",
        generate,
        inputs,
    )


def _old(path: Path | None) -> Subject:
    path = path or dit_pipeline.DEFAULT_PATH
    model = dit_pipeline.load_reference(path)
    sched = dit_pipeline.load_scheduler(path)

    def generate(tr: Any, labels: Tensor, seeds: list[int], steps: int, guidance: float, cfg: str) -> Tensor:
        return dit_pipeline.sample(tr, labels, seeds, steps, guidance, cfg, sched)  # type: ignore[arg-type]

    def inputs(b: int) -> dict[str, Any]:
        return {
            "hidden_states": torch.randn(b, 1, 32, 32, generator=torch.Generator().manual_seed(0)),
            "timestep": torch.full((b,), 500),
            "class_labels": torch.arange(b) % (dit_pipeline.NULL_CLASS + 1),
        }

    return Subject(
        "old",
        "old reference DiT (DiTTransformer2DModel, Fashion-MNIST) — hard case",
        "ε-prediction, DDIM, CFG",
        model,
        path,
        50,
        dit_pipeline.DEFAULT_GUIDANCE,
        path / "fastcache_calibration.safetensors",
        generate,
        inputs,
    )


def load(name: str, path: str | Path | None = None) -> Subject:
    """The model called ``name`` (``"new"`` or ``"old"``), from ``path`` or its shipped folder."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    folder = Path(path) if path is not None else None
    return _new(folder) if name == "new" else _old(folder)
