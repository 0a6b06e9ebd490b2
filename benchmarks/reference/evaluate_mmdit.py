"""Model-card numbers for the reference MMDiT: class accuracy, sensitivity probe, sample grid, FID.

    python -m benchmarks.reference.evaluate_mmdit [--path DIR] [--per-class 20] [--fid-n 0]

* accuracy: the feature network (``feature-net``, 92.7 % on real test images) classifies samples drawn
  from seeds never used elsewhere; the share classified as their intended class.
* sensitivity probe (model-independent, as in the issue that introduced this model): FORA-N reuses every
  block's residual on all steps but every N-th, y_l = x_l + r̂_l; PSNR of the final images against full
  computation on the same seeds. Run for this model at its default steps and guidance, and for the old
  ε-prediction DiT (DDIM-50, CFG 3) for comparison.
Writes ``evaluation.json`` and ``samples.png`` into the model folder.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.metrics import psnr
from benchmarks.reference.features import accuracy, load_feature_net
from fastcache_compile.reference import DEFAULT_PATH, load, sample

EVAL_SEED = 5_000_000  # disjoint from the seeds of benchmarks.compare and of calibration


class ForaProbe:
    """FORA-N on any module list of blocks: compute all blocks every N-th call of block 0, else reuse
    each block's cached residual (per output: y = x + r̂ for outputs paired with an input of that shape)."""

    def __init__(self, blocks: torch.nn.ModuleList, interval: int) -> None:
        self.blocks, self.interval = blocks, interval
        self.calls, self.cache, self.handles = 0, {}, []

    def __enter__(self) -> ForaProbe:
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_hook(self._hook(i), with_kwargs=True))
            self.handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() == 3]

    def _pre(self, i: int) -> Callable[..., Any]:
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if i == 0:
                self.calls += 1

        return pre

    def _hook(self, i: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            outs = out if isinstance(out, tuple) else (out,)
            xs = self._inputs(args, kwargs)
            # SD3's last block returns (None, hidden_states): a None output stays None.
            paired = [None if o is None else next((x for x in xs if x.shape == o.shape), None) for o in outs]
            if (self.calls - 1) % self.interval == 0 or i not in self.cache:
                self.cache[i] = [o if x is None or o is None else o - x for o, x in zip(outs, paired)]
                return out
            new = tuple(r if x is None or r is None else x + r for r, x in zip(self.cache[i], paired))
            return new if isinstance(out, tuple) else new[0]

        return hook


def probe_new(ref: Any, labels: torch.Tensor, seeds: list[int]) -> dict[str, float]:
    full = sample(ref, ref.transformer, labels, seeds)
    res = {}
    for n in (2, 3):
        with ForaProbe(ref.transformer.transformer_blocks, n):
            res[f"fora{n}_psnr_db"] = round(psnr(sample(ref, ref.transformer, labels, seeds), full), 2)
    return res


def probe_old(labels: torch.Tensor, seeds: list[int]) -> dict[str, float]:
    from benchmarks.reference.pipeline import load_reference
    from benchmarks.reference.pipeline import sample as old_sample

    model = load_reference()
    full = old_sample(model, labels, seeds, steps=50, guidance=3.0)
    res = {}
    for n in (2, 3):
        with ForaProbe(model.transformer_blocks, n):
            res[f"fora{n}_psnr_db"] = round(psnr(old_sample(model, labels, seeds, steps=50, guidance=3.0), full), 2)
    return res


def grid_png(images: torch.Tensor, rows: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = ((images.clamp(-1, 1) + 1) / 2)[:, 0].numpy()  # (N, H, W)
    cols = imgs.shape[0] // rows
    canvas = np.ones((rows * 34, cols * 34))
    for k, im in enumerate(imgs[: rows * cols]):
        r, c = divmod(k, cols)
        canvas[r * 34 + 1 : r * 34 + 33, c * 34 + 1 : c * 34 + 33] = im
    plt.imsave(path, canvas, cmap="gray", vmin=0, vmax=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", type=Path, default=DEFAULT_PATH)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--probe-n", type=int, default=32)
    p.add_argument("--skip-old", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ref = load(args.path)
    net = load_feature_net()
    start = time.perf_counter()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    seeds = [EVAL_SEED + i for i in range(labels.numel())]
    images = torch.cat(
        [sample(ref, ref.transformer, labels[i : i + 50], seeds[i : i + 50]) for i in range(0, len(seeds), 50)]
    )
    acc = accuracy(net, images, labels)
    per_class = [round(accuracy(net, images[labels == c], labels[labels == c]), 3) for c in range(10)]
    grid = torch.cat([images[labels == c][:8] for c in range(10)])  # one row per class
    grid_png(grid, 10, args.path / "samples.png")
    plabels = torch.arange(args.probe_n) % 10
    pseeds = [EVAL_SEED + 100_000 + i for i in range(args.probe_n)]
    result: dict[str, Any] = {
        "samples": int(labels.numel()),
        "steps": ref.steps,
        "guidance": ref.guidance,
        "class_accuracy": round(acc, 4),
        "per_class_accuracy": per_class,
        "probe_samples": args.probe_n,
        "probe": probe_new(ref, plabels, pseeds),
    }
    if not args.skip_old:
        result["probe_old_dit_ddim50_cfg3"] = probe_old(plabels, pseeds)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    (args.path / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
