"""Quality, memory and compute-share measurements shared by the benchmark harness.

Quality is measured against the uncached samples of the same seeds (images in [-1, 1], so the data
range is 2). Memory is the peak resident-set growth during sampling (see ``PeakRss``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

DATA_RANGE = 2.0  # samples live in [-1, 1]
_PSNR_CAP = 100.0  # dB for a bit-identical image, so means stay finite


def psnr(images: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of ``images`` against ``ref``, both (N, C, H, W) in [-1, 1]."""
    mse = ((images.double() - ref.double()) ** 2).flatten(1).mean(1)  # (N,)
    per_image = 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(DATA_RANGE**2 * 10 ** (-_PSNR_CAP / 10)))
    return float(per_image.mean())


def ssim(images: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean per-image SSIM (scikit-image, 7x7 window, data_range=2) over channels-first images."""
    a, b = images.double().numpy(), ref.double().numpy()
    scores = [
        structural_similarity(x, y, data_range=DATA_RANGE, channel_axis=0)
        for x, y in zip(a, b)  # each (C, H, W)
    ]
    return float(np.mean(scores))


def rel_l2(images: torch.Tensor, ref: torch.Tensor) -> float:
    """‖images − ref‖₂ / ‖ref‖₂ over the whole set (pixel space: the final latent is the image)."""
    return float((images.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


# -- memory ------------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1)) / 1024.0


def _malloc_trim() -> None:
    # Hand freed heap pages back to the OS so the baseline RSS is the live memory, not glibc's cache of
    # an earlier method's buffers (which would hide this method's growth).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Peak resident-set growth (MiB) of this process while the ``with`` body runs.

    Linux only: the kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` ("5")
    at entry, after ``gc`` and ``malloc_trim``; the result is ``VmHWM`` at exit minus ``VmRSS`` at entry.
    This counts everything sampling allocates (activations, cache state, allocator slack) and nothing
    allocated earlier. Torch's CPU allocator keeps no peak statistics and ``tracemalloc`` cannot see
    tensor memory, so this is the honest measurement available on CPU. ``mb`` is None where the
    kernel interface is missing.
    """

    def __init__(self) -> None:
        self.mb: float | None = None
        self._start = 0.0
        self._ok = False

    def __enter__(self) -> PeakRss:
        gc.collect()
        _malloc_trim()
        try:
            self._start = _status_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            self._ok = True
        except OSError:
            self._ok = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ok:
            with contextlib.suppress(OSError):
                self.mb = max(0.0, _status_mb("VmHWM") - self._start)


# -- compute share of the block stack ------------------------------------------------------------------
@contextlib.contextmanager
def _timed_hooks(start: torch.nn.Module, stop: torch.nn.Module, into: list[float]) -> Iterator[None]:
    t0: list[float] = []
    h1 = start.register_forward_pre_hook(lambda *_: t0.append(time.perf_counter()))
    h2 = stop.register_forward_hook(lambda *_: into.append(time.perf_counter() - t0.pop()))
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


@torch.no_grad()
def compute_shares(model: torch.nn.Module, call: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """Measured wall-time shares of one eager forward: the block stack in the whole model, and
    self-attention (``attn1`` in DiT, the joint ``attn`` in the MMDiT) inside a block. ``call()`` runs one
    representative forward.

    ``ideal_speedup = 1 / (1 − flops_skipped · block_fraction)`` uses ``block_fraction``: what skipping
    blocks can save at most when everything outside the stack (patch embedding, final layer, scheduler,
    CFG arithmetic) still runs.
    """
    from benchmarks.baselines import block_family

    blocks = model.transformer_blocks
    attention = getattr(blocks[0], block_family(model).attention)
    call()  # warm-up: first-call allocations would inflate the first timing
    whole: list[float] = []
    stack: list[float] = []
    attn: list[float] = []
    blk: list[float] = []
    with _timed_hooks(model, model, whole), _timed_hooks(blocks[0], blocks[-1], stack):
        with _timed_hooks(attention, attention, attn), _timed_hooks(blocks[0], blocks[0], blk):
            for _ in range(repeats):
                call()
    # FLOP estimate per token for comparison: attention 4D² + 2ND (projections, scores), MLP 8D² (4x);
    # N counts the image tokens only.
    d = int(blocks[0].norm1.linear.in_features)
    n = int(model.config.sample_size // model.config.patch_size) ** 2
    attn_flops, mlp_flops = 4 * d * d + 2 * n * d, 8 * d * d
    return {
        "block_fraction": float(np.median(stack) / np.median(whole)),
        "attention_fraction_of_block": float(np.median(attn) / np.median(blk)),
        "attention_fraction_of_block_flops": attn_flops / (attn_flops + mlp_flops),
        "forward_s": float(np.median(whole)),
    }
