"""The shipped reference model: a class-conditional flow-matching MMDiT trained on Fashion-MNIST.

    from fastcache_compile.reference import load, sample
    ref = load()
    images = sample(ref, ref.transformer, torch.tensor([0, 3, 7]), seed=0)  # (3, 1, 32, 32) in [-1, 1]

Shipped as package data so ``fastcache generate --model reference`` works from any directory.
"""

from __future__ import annotations

from .model import DEFAULT_PATH, NULL_ROW, Reference, load, sample

__all__ = ["DEFAULT_PATH", "NULL_ROW", "Reference", "load", "sample"]
