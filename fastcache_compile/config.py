"""The one configuration object of the ``fastcache`` backend, validated at the door."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Literal

Lowering = Literal["inductor", "eager", "segments", "tensorrt"]
Approximation = Literal["auto", "reuse", "trajectory", "linear", "direct", "forecast"]

_LOWERINGS = ("inductor", "eager", "segments", "tensorrt")
_APPROXIMATIONS = ("auto", "reuse", "trajectory", "linear", "direct", "forecast")


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

    refresh_every: int | None = None
    """Synchronised refresh: every ``refresh_every``-th step of a generation (0, N, 2N, …) computes
    every block, as FORA and TaylorSeer do; None: only warm-up and the rule decide."""
    refresh_steps: tuple[int, ...] | None = None
    """Steps of a generation (0-based) at which every block computes, for schedules ``refresh_every``
    cannot express (denser early, sparser late; cache-dit's step masks); adds to ``refresh_every``."""
    max_skips: int | None = None
    """Cap on consecutive skipped steps per block: a block computes once its last computed step is
    more than ``max_skips`` steps back; None: no cap (the forecaster's table caps its own gaps)."""

    audit: bool = False
    """Also compute every skipped block and report the true error of its prediction (``stats``);
    costs the full computation, for checking that skips stay within τ."""

    def __post_init__(self) -> None:
        _number("threshold", self.threshold, "a float >= 0 (0 disables skipping), e.g. 0.05", lo=0.0)
        _number("alpha", self.alpha, "a float with 0 < alpha < 1, e.g. 0.05", lo=0.0, hi=1.0, open_=True)
        _integer("warmup_steps", self.warmup_steps, 0)
        if self.num_steps is not None:
            _integer("num_steps", self.num_steps, 1, "None or an int >= 1")
        if self.calibration is not None and not isinstance(self.calibration, (str, os.PathLike)):
            raise ValueError(f"calibration must be a path to a calibration file or None, got {self.calibration!r}")
        if self.approximation not in _APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {_APPROXIMATIONS}, got {self.approximation!r}")
        _integer("max_streams", self.max_streams, 1)
        for name in ("refresh_every", "max_skips"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 1, "None or an int >= 1")
        if self.refresh_steps is not None:
            object.__setattr__(self, "refresh_steps", _step_indices("refresh_steps", self.refresh_steps))
            if self.num_steps is not None and self.refresh_steps and self.refresh_steps[-1] >= self.num_steps:
                raise ValueError(
                    f"refresh_steps {self.refresh_steps!r} lists steps a generation of num_steps={self.num_steps} "
                    f"never reaches (steps are 0..{self.num_steps - 1}); drop them or raise num_steps"
                )
        if self.lowering not in _LOWERINGS:
            raise ValueError(f"lowering must be one of {_LOWERINGS}, got {self.lowering!r}")
        for name in ("token_select", "token_merge", "audit"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.audit and (self.token_select or self.token_merge):
            raise ValueError("audit=True covers block-level caching only: turn token_select/token_merge off for it")
        if self.lowering in ("segments", "tensorrt") and self.max_skips is not None:
            raise ValueError(
                f"max_skips is applied inside the cond graph: use lowering='inductor' or 'eager' with it, or "
                f"refresh_every (host-side) with lowering={self.lowering!r}"
            )
        if self.lowering in ("segments", "tensorrt") and (self.token_select or self.token_merge):
            raise ValueError(
                f"token_select/token_merge need the in-graph cond form: use lowering='inductor' or 'eager' "
                f"with them, not {self.lowering!r}"
            )
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
        fractions = sorted(float(f) for f in buckets)
        if len(set(fractions)) != len(fractions):
            # a repeated bucket would be a second, identical static-shape branch
            raise ValueError(f"token_buckets has duplicate fractions {buckets!r}; list each fraction once")
        object.__setattr__(self, "token_buckets", tuple(fractions))
        _number("token_threshold", self.token_threshold, "a float >= 0, e.g. 0.05", lo=0.0)
        _number("merge_ratio", self.merge_ratio, "a float with 0 <= merge_ratio < 1, e.g. 0.5", lo=0.0, hi=1.0)
        _integer("merge_k", self.merge_k, 1)
        _number("merge_lambda", self.merge_lambda, "a float >= 0, e.g. 1.0", lo=0.0)

    @classmethod
    def from_options(cls, options: FastCacheConfig | dict[str, Any] | None) -> FastCacheConfig:
        """Build a config from what ``torch.compile(..., options=...)`` passed."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"options must be a dict or a FastCacheConfig, got {type(options).__name__}")
        _known(options)
        return cls(**options)

    def replace(self, **changes: Any) -> FastCacheConfig:
        """A copy with some fields changed (the config itself is never mutated)."""
        _known(changes)
        return dataclasses.replace(self, **changes)


def check_token_count(config: FastCacheConfig, num_tokens: int) -> None:
    """Options that depend on the model's token count, checked once the graph is known.

    kNN merging needs ``merge_k`` neighbours besides each token itself.
    """
    if config.token_merge and config.merge_k >= num_tokens:
        raise ValueError(
            f"merge_k={config.merge_k} needs more than {config.merge_k} tokens, but this model has {num_tokens} "
            f"tokens per sample: pass merge_k <= {max(num_tokens - 1, 1)} or token_merge=False"
        )


def _known(options: dict[str, Any]) -> None:
    allowed = [f.name for f in fields(FastCacheConfig)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown fastcache option(s) {unknown}; allowed keys are {allowed}")


def _number(name: str, value: Any, want: str, lo: float, hi: float = math.inf, open_: bool = False) -> None:
    """A real number in [lo, hi) (or (lo, hi) with ``open_``); ``bool`` is an int to Python, not here."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (lo < value if open_ else lo <= value) and value < hi
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


def _integer(name: str, value: Any, lo: int, want: str | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be {want or f'an int >= {lo}'}, got {value!r}")


def _step_indices(name: str, steps: Any) -> tuple[int, ...]:
    """Distinct step indices ≥ 0 as a sorted tuple (lists and ranges are accepted)."""
    ok = isinstance(steps, (tuple, list, range)) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps
    )
    if not ok:
        raise ValueError(f"{name} must be None or a tuple of step indices >= 0, e.g. (0, 5, 9, 14); got {steps!r}")
    return tuple(sorted(set(steps)))
