"""Token merging as one opaque operator, ``fastcache::merge_tokens``.

Inductor generates and compiles a kernel for every operator it lowers. Merging (kNN density by ``cdist``,
``topk`` centres, nearest-centre assignment, weighted ``scatter_add``) sits in every reduced bucket of
the token stack, each with its own token count, so it was lowered once per bucket: 29 s of the cold
compile with three buckets, and the reason selection + merging compiled at 2.8× block caching against
2.0× for selection alone (``benchmarks/results/compile_time.md``). As a custom operator Inductor calls it
as an extern kernel and generates nothing for it. At run time it is the same eager ATen code on a
(batch × bucket) set of tokens, which is small next to the blocks it feeds.
"""

from __future__ import annotations

import torch

from fastcache_compile import tokens as T


@torch.library.custom_op("fastcache::merge_tokens", mutates_args=())
def merge_tokens(
    xk: torch.Tensor, sal_k: torch.Tensor, merge_k: int, merge_lambda: float, keep: int, shared: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the gathered tokens ``xk`` (B, k, D) with saliencies ``sal_k`` (B, k) into ``keep``
    clusters: ``(merged (B, keep, D), assignment (B, k), centres (B, keep))`` as ``tokens.merge``.

    ``shared``: batch-free positional inputs, so every sample gets the same centres.
    """
    temporal = sal_k / sal_k.amax(-1, keepdim=True).clamp_min(1e-12)
    score = T.importance(T.knn_density(xk, merge_k), temporal, merge_lambda)
    if shared:
        score = score.mean(0, keepdim=True).expand_as(score)
    h, assign, centres = T.merge(xk, score, keep)
    # a custom operator's outputs may alias neither its inputs nor each other (keep ≥ k returns both)
    return h.clone(), assign.clone(), centres.clone()


@merge_tokens.register_fake
def _(xk: torch.Tensor, sal_k: torch.Tensor, merge_k: int, merge_lambda: float, keep: int, shared: bool):
    b, n, d = xk.shape
    m = min(keep, n)
    long = torch.int64
    return xk.new_empty(b, m, d), xk.new_empty(b, n, dtype=long), xk.new_empty(b, m, dtype=long)
