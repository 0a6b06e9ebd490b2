"""Write the comparison's outputs: compare.json (raw rows + metadata), compare.md, and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on benchmark machines
import matplotlib.pyplot as plt
import torch

COLUMNS = [
    ("method", "method", "{}"),
    ("setting", "setting", "{}"),
    ("lowering", "lowering", "{}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("latency_s", "latency s/batch", "{:.2f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("flops_skipped", "skipped", "{:.1%}"),
    ("ideal_speedup", "ideal", "{:.2f}x"),
    ("speedup_vs_ideal", "vs ideal", "{:.0%}"),
    ("psnr", "PSNR dB", "{:.2f}"),
    ("ssim", "SSIM", "{:.4f}"),
    ("rel_l2", "rel L2", "{:.4f}"),
    ("fid", "FID-FMNIST", "{:.2f}"),
    ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("bound_violations", "bound viol.", "{:.1%}"),
    ("alpha", "α", "{}"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# FastCache vs. cache baselines on the reference DiT (Fashion-MNIST)",
        "",
        f"{meta['samples']} samples, {meta['steps']} DDIM steps, guidance {meta['guidance']}, cfg={meta['cfg']}, "
        f"batch {meta['batch']}, {meta['threads']} torch thread(s), {meta['cpu']}; mode: {meta['mode']}.",
        "",
        "speedup: vs. uncached with the same lowering, same process. skipped: fraction of block-stack compute "
        "skipped (block executions; attention-only caches weighted by attention's measured share of a block). "
        f"ideal = 1/(1 − skipped·{meta['compute_shares']['block_fraction']:.2f}), the measured block-stack share "
        "of a forward. PSNR/SSIM/rel L2 vs. uncached eager samples of the same seeds; FID-FMNIST over all "
        "samples (FeatureNet features, not Inception: only comparable within this table). peak MB: peak RSS "
        "growth while sampling. bound viol.: share of skipped blocks whose true relative output error exceeded "
        "τ (eager shadow run).",
        "",
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " | notes |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [_cell(row.get(k), f) for k, _, f in COLUMNS]
        note = row.get("error") or row.get("notes") or ""
        lines.append("| " + " | ".join(cells) + f" | {note} |")
    probe = meta.get("diffusers_probe", {})
    if probe:
        lines += [
            "",
            "## diffusers cache hooks on DiTTransformer2DModel",
            "",
            "| config | status | detail |",
            "|---|---|---|",
        ]
        for name, res in probe.items():
            lines.append(f"| `{name}` | {res['status']} | {res['detail']} |")
    lines += ["", f"Total benchmark wall time: {meta.get('wall_s', 0):.0f} s.", ""]
    return "\n".join(lines)


def _pareto(rows: list[dict[str, Any]], metric: str, label: str, path: Path, higher_better: bool) -> None:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = sorted({r["method"] for r in rows})
    cmap = plt.get_cmap("tab20")
    for k, method in enumerate(methods):
        pts = [r for r in rows if r["method"] == method and r.get(metric) is not None and r.get("speedup")]
        pts = [r for r in pts if math.isfinite(r[metric])]
        for lowering, marker in (("eager", "o"), ("inductor", "^")):
            sel = sorted((r for r in pts if r["lowering"] == lowering), key=lambda r: r["speedup"])
            if sel:
                ax.plot(
                    [r["speedup"] for r in sel],
                    [r[metric] for r in sel],
                    marker=marker,
                    color=cmap(k % 20),
                    label=f"{method} ({lowering})",
                    linestyle="-" if len(sel) > 1 else "none",
                )
                for r in sel:
                    ax.annotate(r["setting"], (r["speedup"], r[metric]), fontsize=6, alpha=0.7)
    ax.set_xlabel("speedup vs. uncached (same lowering)")
    ax.set_ylabel(label + (" (higher is better)" if higher_better else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _grid(rows: list[dict[str, Any]], images: dict[str, torch.Tensor], path: Path, columns: int) -> None:
    named = [(r["key"], f"{r['method']} {r['setting']} ({r['lowering']})") for r in rows if r["key"] in images]
    if not named:
        return
    fig, axes = plt.subplots(len(named), 1, figsize=(columns * 0.7 + 2.5, len(named) * 0.75 + 0.3), squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], named):
        imgs = images[key][:columns]  # (K, 1, 32, 32) in [-1, 1]
        strip = torch.cat(list(imgs[:, 0]), dim=1)  # (32, K*32)
        ax.imshow(((strip + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write(out: Path, rows: list[dict[str, Any]], meta: dict[str, Any], images: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: v for k, v in r.items() if k != "key"} for r in rows]
    (out / "compare.json").write_text(json.dumps({"meta": meta, "rows": clean}, indent=2, allow_nan=False))
    (out / "compare.md").write_text(markdown(rows, meta))
    ok = [r for r in rows if not r.get("error")]
    _pareto(ok, "psnr", "PSNR vs. uncached (dB)", out / "pareto_psnr.png", higher_better=True)
    _pareto(ok, "fid", "FID-FMNIST", out / "pareto_fid.png", higher_better=False)
    _grid(ok, images, out / "samples_grid.png", columns=min(10, meta["samples"]))
