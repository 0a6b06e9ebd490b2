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
    token_select: bool = False
    """Run only the moving tokens through the blocks (DESIGN.md "Token selection"); static tokens
    reuse their cached stack residual."""
    token_buckets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    """Fractions of the token count the number of moving tokens is rounded up to; one static-shape
    branch each (the full size is the block-cache branch)."""
    token_threshold: float = 0.05
    """A token moves when ``‖x_i − x̂_i‖ > token_threshold · ‖x̂_i‖`` at the block-stack entry."""
    token_merge: bool = False
    """Merge similar tokens (kNN density, per sample) before the blocks, copy the update back after."""
    merge_ratio: float = 0.5
    """Fraction of the tokens entering the blocks that merging removes."""
    merge_k: int = 4
    """Neighbours in the kNN density ``ρ_i``."""
    merge_lambda: float = 1.0
    """λ in the importance ``S_i = ρ_i (1 + λ ρ^tm_i)``."""

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
        for name in ("token_select", "token_merge"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        buckets = self.token_buckets
        if (
            not isinstance(buckets, (tuple, list))
            or not buckets
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0.0 < f <= 1.0 for f in buckets)
        ):
            raise ValueError(
                f"token_buckets must be a non-empty tuple of fractions in (0, 1], e.g. (0.25, 0.5, 1.0); "
                f"got {buckets!r}"
            )
        object.__setattr__(self, "token_buckets", tuple(sorted(float(f) for f in buckets)))
        if not isinstance(self.token_threshold, (int, float)) or not self.token_threshold >= 0:
            raise ValueError(f"token_threshold must be a float >= 0, got {self.token_threshold!r}")
        if not isinstance(self.merge_ratio, (int, float)) or not 0.0 <= self.merge_ratio < 1.0:
            raise ValueError(f"merge_ratio must be a float with 0 <= merge_ratio < 1, got {self.merge_ratio!r}")
        if not isinstance(self.merge_k, int) or isinstance(self.merge_k, bool) or self.merge_k < 1:
            raise ValueError(f"merge_k must be an int >= 1, got {self.merge_k!r}")
        if not isinstance(self.merge_lambda, (int, float)) or not self.merge_lambda >= 0:
            raise ValueError(f"merge_lambda must be a float >= 0, got {self.merge_lambda!r}")

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
