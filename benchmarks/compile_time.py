"""Cold compile time of block caching, token selection and token merging under Inductor lowering.

    python -m benchmarks.compile_time            # ~20 min on 2 cores
    python -m benchmarks.compile_time --steps 6  # shorter generations, same compiles
    python -m benchmarks.compile_time --shared-only  # the default lowering's rows only, a third of the time
    python -m benchmarks.compile_time --runtime  # steady speed of shared vs separate bodies, one process

The shipped reference MMDiT (8 blocks, the last one different), CFG batch of 4, τ = 0.1. Each row runs
in its own process with an empty Inductor cache: the first generation compiles (Dynamo, the passes,
the init and cached variants), then ``--repeats`` generations are timed. Compile time is the first
generation minus the median steady one. Every mode is run with shared block bodies
(``passes/share_blocks.py``, the default) and without them, interleaved; the final images of the
two must agree. Writes ``benchmarks/results/compile_time.{json,md}``.

``--runtime`` compiles each mode twice in one process (shared bodies, then separate ones; τ differs by
1e-12 so the two compiles do not share Dynamo's cache entry) and interleaves their generations, since
steady times from different processes on a shared machine are not comparable. Writes
``compile_time_runtime.json`` and appends its table to ``compile_time.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MODES: dict[str, dict[str, Any]] = {
    "block caching": {},
    "token selection": {"token_select": True, "token_threshold": 0.05},
    "selection + merging": {"token_select": True, "token_threshold": 0.05, "token_merge": True, "merge_ratio": 0.5},
}


def _no_sharing(gm: Any) -> list:
    """``share_repeated_blocks`` turned off: every block compiled on its own, as before the pass."""
    return []


def _row(mode: str, share: bool, steps: int, repeats: int, image_path: str) -> dict[str, Any]:
    """One cold compile, in this (fresh) process."""
    import torch

    import fastcache_compile
    import fastcache_compile.backend as backend
    from fastcache_compile.reference import load, sample

    torch.set_num_threads(1)
    if not share:
        backend.share_repeated_blocks = _no_sharing
    lowered: list[float] = []
    lower = backend._lower

    def timed(gm, example_inputs, lowering):
        t0 = time.perf_counter()
        fn = lower(gm, example_inputs, lowering)
        lowered.append(round(time.perf_counter() - t0, 1))
        return fn

    backend._lower = timed
    ref = load()
    options = {"threshold": 0.1, "lowering": "inductor", **MODES[mode]}
    model = torch.compile(ref.transformer, backend="fastcache", options=options)
    labels = torch.tensor([0, 3])

    def generate(seed: int) -> tuple[float, float, torch.Tensor]:
        w, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = sample(ref, model, labels, seed=seed, steps=steps)
        return time.perf_counter() - w, time.process_time() - c, out

    first_wall, first_cpu, _ = generate(0)
    steady = [generate(1) for _ in range(repeats)]
    torch.save(steady[-1][2], image_path)
    wall = statistics.median(s[0] for s in steady)
    cpu = statistics.median(s[1] for s in steady)
    st = fastcache_compile.stats(model)
    return {
        "mode": mode,
        "shared_bodies": share,
        "compile_s": round(first_wall - wall, 1),
        "compile_cpu_s": round(first_cpu - cpu, 1),
        "lowering_s": lowered,  # init variant, cached variant
        "steady_wall_s": round(wall, 3),
        "steady_cpu_s": round(cpu, 3),
        "skipped": round(st["blocks_skipped"] / max(1, st["blocks_computed"] + st["blocks_skipped"]), 3),
    }


def _runtime(modes: list[str], steps: int, repeats: int) -> list[dict[str, Any]]:
    """Steady generation time, shared vs separate bodies, interleaved in this process."""
    import torch

    import fastcache_compile.backend as backend
    from fastcache_compile.reference import load, sample

    torch.set_num_threads(1)
    ref, labels, share = load(), torch.tensor([0, 3]), backend.share_repeated_blocks
    rows = []
    for mode in modes:
        models = {}
        for shared, tau in ((True, 0.1), (False, 0.1 + 1e-12)):
            backend.share_repeated_blocks = share if shared else _no_sharing
            options = {"threshold": tau, "lowering": "inductor", **MODES[mode]}
            models[shared] = torch.compile(ref.transformer, backend="fastcache", options=options)
            with torch.no_grad():  # compiles init and cached variants
                sample(ref, models[shared], labels, seed=0, steps=steps)
        backend.share_repeated_blocks = share
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(repeats):
            for shared in (True, False) if r % 2 == 0 else (False, True):
                c = time.process_time()
                with torch.no_grad():
                    sample(ref, models[shared], labels, seed=1, steps=steps)
                times[shared].append(time.process_time() - c)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        rows.append({"mode": mode, "shared_cpu_s": round(on, 3), "separate_cpu_s": round(off, 3), "ratio": on / off})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _spawn(mode: str, share: bool, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out, image = workdir / "row.json", workdir / f"{mode}-{share}.pt"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=workdir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.compile_time", "--row", mode, "--share", str(int(share))]
    cmd += ["--steps", str(args.steps), "--repeats", str(args.repeats), "--out", str(out), "--image", str(image)]
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    row = json.loads(out.read_text())
    row["image"] = str(image)
    return row


def _table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {(r["mode"], r["shared_bodies"]): r for r in rows}
    base = by.get(("block caching", True))
    lines = [
        "# Cold compile time under Inductor lowering (reference MMDiT)",
        "",
        f"{meta['machine']}, torch {meta['torch']}, {meta['steps']} steps, one torch thread, empty Inductor "
        "cache per row. Compile = first generation − median steady generation.",
        "",
        "| mode | shared bodies | compile (s) | × block caching | lowering init / cached (s) | "
        "steady gen. (s) | skipped | max abs diff on / off |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = by.get(("block caching", r["shared_bodies"]))
        ratio = f"{r['compile_s'] / ref['compile_s']:.2f}×" if ref else "–"
        diff = r.get("diff_vs_unshared")
        lines.append(
            f"| {r['mode']} | {'yes' if r['shared_bodies'] else 'no'} | {r['compile_s']:.1f} | {ratio} | "
            f"{' / '.join(f'{x:.1f}' for x in r['lowering_s'])} | {r['steady_wall_s']:.2f} | "
            f"{100 * r['skipped']:.0f} % | {'' if diff is None else f'{diff:.1e}'} |"
        )
    if base:
        lines += [
            "",
            "× block caching compares with block caching under the same lowering (shared or not). Skipped: "
            "block calls the block cache skipped (token rows save work by running fewer tokens instead).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtime", action="store_true", help="steady speed, shared vs separate bodies")
    parser.add_argument("--shared-only", action="store_true", help="only the shared-body rows (the default)")
    parser.add_argument("--row", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        row = _row(args.row, bool(args.share), args.steps, args.repeats, args.image)
        Path(args.out).write_text(json.dumps(row))
        return 0

    if args.runtime:
        rows = _runtime(["block caching", "token selection"], args.steps, max(args.repeats, 7))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "compile_time_runtime.json").write_text(json.dumps(rows, indent=2) + "\n")
        lines = [
            "",
            "## Steady speed, one process, interleaved (`--runtime`)",
            "",
            "| mode | shared bodies (CPU s / gen.) | separate bodies | shared / separate |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['mode']} | {r['shared_cpu_s']:.3f} | {r['separate_cpu_s']:.3f} | {r['ratio']:.3f} |" for r in rows
        ]
        with (RESULTS / "compile_time.md").open("a") as md:
            md.write("\n".join(lines) + "\n")
        return 0

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            if args.shared_only:
                rows.append(_spawn(mode, True, args, Path(tmp)))
                rows[-1].pop("image")
                print(json.dumps(rows[-1]), flush=True)
                continue
            pair = [_spawn(mode, share, args, Path(tmp)) for share in (True, False)]
            on, off = (torch.load(r.pop("image")) for r in pair)
            pair[0]["diff_vs_unshared"] = float((on - off).abs().max())
            rows += pair
            print(json.dumps(pair), flush=True)
    meta = {
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "torch": torch.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compile_time.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "compile_time.md").write_text(_table(rows, meta))
    print(_table(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
