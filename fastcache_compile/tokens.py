"""Token-level math of FastCache (DESIGN.md, "Token selection" and "Token merging"), as plain tensor code.

Nothing here touches a graph; the token passes wire these functions in. All functions work per
sample: a batch never mixes tokens of different samples (CFG halves, different prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def saliency(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-token motion ``s_i = ‖x_i − x̂_i‖²``: (B, N, D) → (B, N), in float32."""
    return (x.float() - x_hat.float()).pow(2).sum(-1)


def bucket_size(count: int, num_tokens: int, buckets: Sequence[float]) -> int:
    """Round a motion-token count *up* to the smallest bucket ``ceil(f·N)`` that holds it."""
    sizes = sorted({max(1, math.ceil(f * num_tokens)) for f in buckets})
    for size in sizes:
        if size >= count:
            return size
    return num_tokens


def motion_count(sal: torch.Tensor, x_hat: torch.Tensor, token_threshold: float) -> int:
    """Tokens (max over the batch) whose relative motion ``s_i/‖x̂_i‖²`` exceeds ``token_threshold²``."""
    ref = x_hat.float().pow(2).sum(-1).clamp_min(1e-12)  # (B, N)
    moving = (sal / ref) > token_threshold**2
    return int(moving.sum(-1).max())


def moving_count(sal: torch.Tensor, x_hat: torch.Tensor, token_threshold: float) -> torch.Tensor:
    """In-graph ``motion_count``: a () int64 tensor, so the bucket choice needs no host sync."""
    ref = x_hat.float().pow(2).sum(-1).clamp_min(1e-12)
    return ((sal / ref) > token_threshold**2).sum(-1).amax()


def select(sal: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of each sample's k most salient tokens, sorted so gathers keep token order."""
    idx = sal.topk(k, dim=-1).indices
    return idx.sort(dim=-1).values


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, N, D), (B, k) → (B, k, D)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter(base: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Copy of ``base`` (B, N, D) with rows ``idx`` (B, k) replaced by ``values`` (B, k, D)."""
    return base.scatter(1, idx.unsqueeze(-1).expand(-1, -1, base.shape[-1]), values)


def knn_density(h: torch.Tensor, k: int) -> torch.Tensor:
    """``ρ_i = exp(−mean_{j∈kNN(i)} ‖h_i − h_j‖²)`` per sample: (B, N, D) → (B, N).

    Distances are divided by D so the density does not vanish for wide hidden states.
    """
    d2 = torch.cdist(h.float(), h.float()).pow(2) / h.shape[-1]  # (B, N, N)
    d2 = d2 + torch.eye(h.shape[1], device=h.device) * torch.finfo(torch.float32).max  # exclude self
    nearest = d2.topk(min(k, h.shape[1] - 1), dim=-1, largest=False).values  # (B, N, k)
    return torch.exp(-nearest.mean(-1))


def importance(density: torch.Tensor, temporal: torch.Tensor, lam: float) -> torch.Tensor:
    """``S_i = ρ_i (1 + λ ρ^tm_i)``."""
    return density * (1.0 + lam * temporal)


def merge(h: torch.Tensor, score: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge each sample's N tokens into ``keep`` clusters.

    The ``keep`` tokens of lowest importance (the least redundant) become cluster centres; every other
    token joins its nearest centre, and a cluster's value is the S-weighted mean of its members.
    Returns merged (B, keep, D), the assignment (B, N) token → cluster used by ``unmerge``, and the
    centres (B, keep): the token whose position (RoPE row) a cluster takes.
    """
    b, n, d = h.shape
    if keep >= n:
        ident = torch.arange(n, device=h.device).expand(b, n)
        return h, ident, ident
    centres = score.topk(keep, dim=-1, largest=False).indices.sort(-1).values  # (B, keep)
    c = gather(h, centres)  # (B, keep, D)
    assign = torch.cdist(h.float(), c.float()).argmin(-1)  # (B, N)
    # a centre always belongs to its own cluster, even when another centre is equally close
    assign = assign.scatter(1, centres, torch.arange(keep, device=h.device).expand(b, keep))
    w = score.clamp_min(1e-12).unsqueeze(-1).to(h.dtype)  # (B, N, 1)
    num = torch.zeros(b, keep, d, dtype=h.dtype, device=h.device).scatter_add(
        1, assign.unsqueeze(-1).expand(-1, -1, d), h * w
    )
    den = torch.zeros(b, keep, 1, dtype=h.dtype, device=h.device).scatter_add(1, assign.unsqueeze(-1), w)
    return num / den, assign, centres


def unmerge(merged: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Copy each cluster's value back to all its tokens: (B, keep, D), (B, N) → (B, N, D)."""
    return gather(merged, assign)
