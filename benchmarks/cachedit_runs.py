"""cache-dit (vipshop/cache-dit) as a benchmark peer, driven through its own ``cache_dit.enable_cache``.

DBCache ("dual block cache"): the first ``Fn`` blocks always run; the relative L1 change of their
output residual since the last computed step decides (threshold ``rdt``) whether the middle blocks
run or are replaced by their cached residual; the last ``Bn`` blocks always run and correct the
approximation. The optional TaylorSeer calibrator forecasts the cached residual with a Taylor
expansion in the step index instead of reusing it as is.

cache-dit registers its SD3 adapter for ``StableDiffusion3*`` *pipelines*; a bare
``SD3Transformer2DModel`` takes a ``BlockAdapter`` with ``ForwardPattern.Pattern_1`` (blocks take
``(hidden_states, encoder_hidden_states)`` and return ``(encoder_hidden_states, hidden_states)``),
exactly what its SD3 adapter builds. A transformer-only adapter gets a persistent cache context, so
``reset`` refreshes it before each generation (``cache_dit.refresh_context``).

CFG: the loop batches ``[cond; uncond]`` into one call (``enable_separate_cfg=False``), so the
whole batch decides together, as the other rows do.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from benchmarks.baselines import Baseline, block_family

# cache-dit's ForwardPattern per block family: Pattern_1 takes (hidden_states, encoder_hidden_states) and
# returns (encoder_hidden_states, hidden_states); Pattern_3 takes and returns hidden_states alone.
_PATTERNS = {"JointTransformerBlock": "Pattern_1", "BasicTransformerBlock": "Pattern_3"}

# cache-dit logs every context at INFO; the harness reports what matters itself.
logging.getLogger("CACHE_DIT").setLevel(logging.WARNING)


class CacheDit(Baseline):
    """cache-dit DBCache ``F{fn}B{bn}`` at residual-diff threshold ``rdt``, optionally with TaylorSeer."""

    def __init__(
        self,
        model: torch.nn.Module,
        fn: int,
        bn: int,
        rdt: float,
        steps: int,
        taylorseer_order: int = 0,
        warmup_steps: int = 2,
    ) -> None:
        num_blocks = len(model.transformer_blocks)
        if fn < 1 or bn < 0 or fn + bn > num_blocks:
            raise ValueError(f"need 1 <= Fn and 0 <= Bn with Fn + Bn <= {num_blocks}, got F{fn}B{bn}")
        if taylorseer_order < 0:
            raise ValueError(f"taylorseer_order must be 0 (off), 1 or 2, got {taylorseer_order}")
        # Its own copy: enable_cache patches the transformer's forward and wraps its block list.
        super().__init__(copy.deepcopy(model), f"F{fn}B{bn} rdt={rdt:g}")
        self.method = "cache-dit+taylorseer" if taylorseer_order else "cache-dit"
        if taylorseer_order:
            self.setting += f" o{taylorseer_order}"
        self.fn, self.bn, self.rdt, self.steps = fn, bn, rdt, steps
        self.order, self.warmup_steps = taylorseer_order, warmup_steps
        self._enabled = False

    def _configs(self) -> dict[str, Any]:
        import cache_dit

        cache = cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.fn,
            Bn_compute_blocks=self.bn,
            residual_diff_threshold=self.rdt,
            max_warmup_steps=self.warmup_steps,
            num_inference_steps=self.steps,
            enable_separate_cfg=False,
        )
        out: dict[str, Any] = {"cache_config": cache}
        if self.order:
            out["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.order)
        return out

    def _apply(self) -> None:
        import cache_dit
        from cache_dit import BlockAdapter, ForwardPattern

        if self._enabled:  # patched once; later activations only refresh the context
            self.reset()
            return
        adapter = BlockAdapter(
            transformer=self.model,
            blocks=self.model.transformer_blocks,
            forward_pattern=getattr(ForwardPattern, _PATTERNS[block_family(self.model).name]),
            check_forward_pattern=True,
        )
        cache_dit.enable_cache(adapter, **self._configs())
        self._enabled = True

    def reset(self) -> None:
        import cache_dit

        if self._enabled:
            cache_dit.refresh_context(self.model, **copy.deepcopy(self._configs()))
