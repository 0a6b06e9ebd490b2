"""Which graph input plays which role: module state, latents, timestep, conditioning (stream key).

Positions are fixed per graph at construction, so a call reads only the inputs it needs. The
timestep is found by name (Dynamo's ``l_<arg>_`` placeholders) or, when its name is unknown
(``c_noise``, ``sigma_t``), by its role: a per-sample float input, not the latents, that changes
between two calls of one conditioning stream. Until it is found the candidates stay part of the
stream key, so no stream is ever served from another's cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from .passes.outline_blocks import _is_state_input

# Names of the inputs that change every step by design: they never identify a conditioning stream.
# Everything else the user passes (class labels, text states, pooled embeddings, masks, ids) does.
_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "time", "noise_level")
_LATENT_NAMES = ("hidden_states", "x", "sample", "latents", "latent_model_input", "img", "z", "x_t")
SEARCH_CALLS = 8  # calls to watch for an unnamed timestep before saying none was found


def _arg_name(placeholder: fx.Node) -> str:
    # ``l_timestep_``; decorated forwards (``*args, **kwargs`` wrappers) give ``l_kwargs_timestep_``
    name = placeholder.name.lower()
    for prefix in ("l_", "kwargs_", "args_"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.rstrip("_")


def _is_module_state(node: fx.Node, value: Any) -> bool:
    # The graph's own rule, plus the runtime value (a Parameter whose placeholder lacks metadata).
    return _is_state_input(node) or isinstance(value, torch.nn.Parameter)


def _fingerprint(t: torch.Tensor) -> bytes:
    # Exact bytes for small tensors (labels, pooled embeddings); for large ones a strided sample plus
    # two global sums, so different prompts never collide in practice.
    flat = t.detach().reshape(-1)
    if flat.numel() > 4096:
        idx = torch.linspace(0, flat.numel() - 1, 4096, device=flat.device).long()
        sample = flat[idx]
        sums = torch.stack([flat.double().sum(), (flat.double() ** 2).sum()])
        parts = [sample.cpu().numpy().tobytes(), sums.cpu().numpy().tobytes()]
    else:
        parts = [flat.cpu().numpy().tobytes()]
    return hashlib.sha1(b"".join(parts) + str((tuple(t.shape), t.dtype)).encode()).digest()


def _key(args: Sequence[Any], positions: Sequence[int]) -> bytes:
    return hashlib.sha1(b"".join(_fingerprint(args[i]) for i in positions)).digest()


class Roles:
    def __init__(self, placeholders: Sequence[fx.Node], example_inputs: Sequence[Any]) -> None:
        state = [_is_module_state(n, v) for n, v in zip(placeholders, example_inputs)]
        # The model instance is named by its first Parameter (a buffer may be shared between models).
        params = [i for i, v in enumerate(example_inputs) if state[i] and isinstance(v, torch.nn.Parameter)]
        module_state = params or [i for i, s in enumerate(state) if s]
        self.owner = module_state[0] if module_state else None
        names = [_arg_name(n) for n in placeholders]
        self.user = [i for i, v in enumerate(example_inputs) if isinstance(v, torch.Tensor) and not state[i]]
        # Module state shapes are guarded by Dynamo (or follow the SymInt inputs, which are kept here).
        self.signature = [i for i in range(len(example_inputs)) if not state[i]]
        self.timestep = next((i for i in self.user if names[i] in _TIMESTEP_NAMES), None)
        self.latent = next((i for i in self.user if names[i] in _LATENT_NAMES), self.user[0] if self.user else None)
        self.cond = [i for i in self.user if i not in (self.timestep, self.latent)]
        # None: not looked for yet; []: found by name, or given up
        self.candidates: list[int] | None = None if self.timestep is None else []
        self._seen: dict[bytes, list[tuple[bytes, float]]] = {}
        self._calls = 0

    @property
    def searching(self) -> bool:
        return self.candidates is None or bool(self.candidates)

    def keys(self, args: Sequence[Any]) -> tuple[bytes, bytes]:
        """(slot key, schedule key): the schedule must see a stream repeat even while candidates are
        still part of the slot key."""
        key = _key(args, self.cond)
        if not self.candidates:
            return key, key
        return key, _key(args, [i for i in self.cond if i not in self.candidates])

    def search(self, args: Sequence[Any]) -> tuple[str, float | None]:
        """Watch one call: ("found", previous timestep value) the call the timestep is recognised,
        ("none", None) the call the search gives up (or finds no candidate), else ("", None)."""
        if self.candidates is None:
            latent = args[self.latent] if self.latent is not None else None
            batch = latent.shape[0] if isinstance(latent, torch.Tensor) and latent.dim() else 1
            self.candidates = [
                i for i in self.cond if args[i].is_floating_point() and 0 < args[i].numel() <= max(batch, 1)
            ]
            if not self.candidates:
                return "none", None
        stream = _key(args, [i for i in self.cond if i not in self.candidates])
        now = [(_fingerprint(args[i]), float(args[i].detach().float().max())) for i in self.candidates]
        before = self._seen.get(stream, now)
        self._seen[stream] = now
        changed = [(i, b[1]) for i, a, b in zip(self.candidates, now, before) if a[0] != b[0]]
        if changed:
            moved = {i for i, _ in changed}
            self.timestep = changed[0][0]
            self.cond = [i for i in self.cond if i not in moved]  # several moving ones: none is a stream
            self.candidates, self._seen = [], {}
            return "found", changed[0][1]
        self._calls += 1
        if self._calls >= SEARCH_CALLS:
            self.candidates, self._seen = [], {}
            return "none", None
        return "", None
