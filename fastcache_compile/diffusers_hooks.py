"""Refuse to run beside a diffusers cache (``model.enable_cache(...)``) on the same model.

A diffusers cache hook replaces block forwards with its own skip logic; traced by Dynamo it breaks
the model into pieces without a block stack, so fastcache would quietly step aside while the hook
serves cached outputs of its own. Two caches on one model are never what a user wants; say so.

Detection has two places where the module is in hand: the frame Dynamo is compiling (its ``self`` /
``module`` locals: the model, a hooked block, or the hook object itself) and ``stats``/``reset``.
A graph compiled while a hook was active refuses every call for as long as the hook stays enabled.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

# The diffusers modules whose hooks are caches (block skipping or output reuse), by module name:
# hooks from other diffusers modules (offloading, layerwise casting, context parallelism) are fine.
_CACHE_HOOK_MODULES = frozenset(
    {
        "faster_cache",
        "first_block_cache",
        "mag_cache",
        "pyramid_attention_broadcast",
        "sea_cache",
        "taylorseer_cache",
        "text_kv_cache",
    }
)


def _is_cache_hook(hook: Any) -> bool:
    module = type(hook).__module__
    return module.startswith("diffusers.hooks.") and module.rsplit(".", 1)[-1] in _CACHE_HOOK_MODULES


def cache_hooks(obj: Any) -> list[str]:
    """What diffusers caching is active on ``obj`` (a module tree or a diffusers hook); [] if none."""
    if _is_cache_hook(obj):
        return [type(obj).__name__]
    if not isinstance(obj, torch.nn.Module):
        return []
    found = []
    config = getattr(obj, "_cache_config", None)  # diffusers' CacheMixin.enable_cache sets it
    if config is not None:
        found.append(type(config).__name__)
    for sub in obj.modules():
        registry = sub.__dict__.get("_diffusers_hook")
        for name, hook in getattr(registry, "hooks", {}).items():
            if _is_cache_hook(hook) and name not in found:
                found.append(name)
    return found


def refusal(found: list[str]) -> ValueError:
    return ValueError(
        f"fastcache: a diffusers cache is enabled on this model ({', '.join(found)}); two caches on one "
        "model serve each other's stale outputs. Remove it with model.disable_cache() (or, for a hook "
        "applied directly, its registry's remove_hook) and keep backend='fastcache', or compile without "
        "fastcache to use the diffusers cache"
    )


def traced_owners() -> list[Any]:
    """Objects of the frame Dynamo is compiling now that carry a diffusers cache (empty if none)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):  # another torch version: stats() still checks
        return []
    if tx is None:
        return []
    return [v for k, v in tx.f_locals.items() if k in ("self", "module") and cache_hooks(v)]


class Refusing:
    """Stands in for a graph compiled while a diffusers cache was active: raises while it still is."""

    def __init__(self, fn: Callable, owners: list[Any]) -> None:
        self._fn = fn
        # A graph traced inside a cache hook's own code runs only while such a hook is installed;
        # one traced for a hooked model runs again after ``disable_cache()`` once the model is clean.
        self._hooks = [type(o).__name__ for o in owners if not isinstance(o, torch.nn.Module)]
        self._modules = [weakref.ref(o) for o in owners if isinstance(o, torch.nn.Module)]

    def __call__(self, *args: Any) -> Any:
        found = self._hooks + [h for ref in self._modules if (m := ref()) is not None for h in cache_hooks(m)]
        if found:
            raise refusal(found)
        return self._fn(*args)
