"""The one configuration object of the ``fastcache`` backend, validated at the door."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any, Literal

Lowering = Literal["inductor", "eager"]
Approximation = Literal["auto", "reuse", "trajectory", "linear", "direct"]

_LOWERINGS = ("inductor", "eager")
_APPROXIMATIONS = ("auto", "reuse", "trajectory", "linear", "direct")


@dataclass(frozen=True)
class FastCacheConfig:
    """Options of ``torch.compile(model, backend="fastcache", options=...)``.

    ``options`` may be this dataclass or a dict with a subset of its field names.
    """

    threshold: float = 0.05
    """τ: tolerated relative RMS change of a block's input; 0 never skips."""
    alpha: float = 0.05
    """Significance level of the chi-square test (paper default)."""
    warmup_steps: int = 2
    """The first steps of every generation always compute (the trajectory form needs two)."""
    num_steps: int | None = None
    """Steps per generation if known; the last one then always computes."""
    calibration: str | os.PathLike[str] | None = None
    """Calibration file from ``fastcache_compile.calibrate``; None means plain residual reuse."""
    approximation: Approximation = "auto"
    """Skip-path predictor; "auto" = "trajectory" with a calibration (measured best), else "reuse"."""
    max_streams: int = 4
    """State slots per block: one per conditioning stream (cond / uncond called separately)."""
    lowering: Lowering = "inductor"
    """Backend the rewritten graph is handed to."""

    def __post_init__(self) -> None:
        if not isinstance(self.threshold, (int, float)) or not self.threshold >= 0:
            raise ValueError(f"threshold must be a float >= 0 (0 disables skipping), got {self.threshold!r}")
        if not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be a float with 0 < alpha < 1 (e.g. 0.05), got {self.alpha!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise ValueError(f"num_steps must be None or an int >= 1, got {self.num_steps!r}")
        if self.calibration is not None and not isinstance(self.calibration, (str, os.PathLike)):
            raise ValueError(f"calibration must be a path to a calibration file or None, got {self.calibration!r}")
        if self.approximation not in _APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {_APPROXIMATIONS}, got {self.approximation!r}")
        if not isinstance(self.max_streams, int) or self.max_streams < 1:
            raise ValueError(f"max_streams must be an int >= 1, got {self.max_streams!r}")
        if self.lowering not in _LOWERINGS:
            raise ValueError(f"lowering must be one of {_LOWERINGS}, got {self.lowering!r}")

    @classmethod
    def from_options(cls, options: FastCacheConfig | dict[str, Any] | None) -> FastCacheConfig:
        """Build a config from what ``torch.compile(..., options=...)`` passed."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"options must be a dict or a FastCacheConfig, got {type(options).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"unknown fastcache option(s) {unknown}; allowed keys are {allowed}")
        return cls(**options)

    def replace(self, **changes: Any) -> FastCacheConfig:
        """A copy with some fields changed (the config itself is never mutated)."""
        return dataclasses.replace(self, **changes)
