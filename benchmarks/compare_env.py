"""Small helpers of ``benchmarks.compare``: the machine description and error summaries for the report."""

from __future__ import annotations

import os
import platform
import traceback
from pathlib import Path
from typing import Any

import diffusers
import torch

_REPO = str(Path(__file__).resolve().parents[1])


def environment(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import cache_dit

        cache_dit_version = getattr(cache_dit, "__version__", "?")
    except ImportError:
        cache_dit_version = None
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cache_dit": cache_dit_version,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }


def describe_error(err: BaseException) -> str:
    """``Type: first line (at file:line)``, naming the innermost frame of this repository (not of torch),
    so a report reader sees where it broke; no machine paths."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if _REPO in f.filename and ".venv" not in f.filename] or frames[-1:]
    where = f" (at {Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
    first = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {first}{where}"
