"""Make a diffusers context-parallel model traceable with ``fullgraph=True`` before its first call.

diffusers' context-parallel split hooks (``model.enable_parallelism``) do two things on a model's
first forward that Dynamo cannot trace, so ``torch.compile(..., fullgraph=True)`` of a cold model
fails before any backend sees a graph (the backend cannot help: it runs after tracing):

- ``ModuleForwardMetadata`` reads ``inspect.signature`` of the hooked module's ``forward`` the
  first time it looks a parameter up (``hasattr(..., "__wrapped__")`` inside ``inspect`` breaks the
  trace). The result is cached on the hook, so filling that cache up front, with exactly the
  indices diffusers would compute, removes the break; one eager call does the same.
- Wan's plan splits ``timestep`` only when it is 2-D; a 1-D timestep (Wan 2.1) logs a
  ``logger.warning_once`` on every call, and Dynamo refuses ``Logger`` methods. That one method of
  that one logger is registered with ``torch._dynamo.config.ignore_logging_functions``: under
  tracing the warning is dropped (the eager path still logs it); nothing else is silenced.
"""

from __future__ import annotations

import inspect
import logging

import torch

_CP_LOGGER = "diffusers.hooks.context_parallel"


def _split_hooks(model: torch.nn.Module) -> list:
    hooks = []
    for sub in model.modules():
        registry = sub.__dict__.get("_diffusers_hook")
        for hook in getattr(registry, "hooks", {}).values():
            if type(hook).__name__ == "ContextParallelSplitHook":
                hooks.append(hook)
    return hooks


def prepare_context_parallel(model: torch.nn.Module) -> int:
    """Call after ``model.enable_parallelism(...)`` and before ``torch.compile(..., fullgraph=True)``.

    Returns how many split hooks were prepared (0: the model has no context parallelism, and
    nothing was changed). Safe to call more than once.
    """
    hooks = _split_hooks(model)
    for hook in hooks:
        meta = getattr(hook, "module_forward_metadata", None)
        cls = getattr(meta, "_cls", None)
        if meta is None or cls is None or not hasattr(meta, "cached_parameter_indices"):
            raise RuntimeError(
                "fastcache: this diffusers version's context-parallel hooks are not laid out as expected; "
                "instead of prepare_context_parallel, run the model once eagerly before compiling it"
            )
        if meta.cached_parameter_indices is None:
            names = list(inspect.signature(cls.forward).parameters)[1:]  # without ``self``, as diffusers
            meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}
    if hooks:
        warn_once = getattr(logging.getLogger(_CP_LOGGER), "warning_once", None)
        if warn_once is not None:  # transformers' logging patch defines it
            torch._dynamo.config.ignore_logging_functions.add(warn_once)
    return len(hooks)
