"""Routing measured on its own: how much of an assembly's loss is sending an image to the
wrong part, and how much is the part's own classification.

An assembly's output is a block of logits per part; its prediction is the argmax over all of
them, so it first *routes* (the block holding the largest logit) and then *classifies*
(the largest logit within that block). With ``s_k(x)`` the largest logit of part ``k``'s block:

``routing_accuracy``
    the share of test images whose largest logit lies in the block of the part that owns
    their class;
``oracle_accuracy`` (and ``oracle_balanced_accuracy``, the mean over classes)
    the accuracy when every image is sent to its own part: the argmax within the owning
    block only, i.e. the assembly with perfect routing;
``auroc_one_vs_rest[k]``
    the AUROC of ``s_k(x) - max_{l != k} s_l(x)`` for telling part ``k``'s images from all
    others (the margin by which part ``k`` wins or loses);
``auroc_pairs["k-l"]``
    the AUROC of ``s_k(x) - s_l(x)`` on the images of parts ``k`` and ``l`` only, part
    ``k``'s images the positives.

AUROC is the Mann-Whitney statistic: the probability that a positive scores above a
negative, ties counting one half; exact, from ranks.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def auroc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """``P(p > n) + P(p == n) / 2`` over all pairs of a positive and a negative score."""
    pos = positives.detach().double().flatten()
    neg = negatives.detach().double().flatten()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    scores = torch.cat([pos, neg])
    order = torch.sort(scores, stable=True).indices
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # ties share the mean of their ranks
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    rank_sum = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    ranks = (rank_sum / counts.double())[inverse]
    u = float(ranks[:len(pos)].sum()) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def routing_metrics(logits: torch.Tensor, labels: torch.Tensor,
                    blocks: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The measures of the module docstring for assembled ``logits`` ``(N, outputs)`` of
    images whose true output is ``labels`` (``(N,)``), part ``k`` owning outputs
    ``blocks[k]`` (together every output exactly once)."""
    n_out = logits.shape[1]
    owner = torch.full((n_out,), -1, dtype=torch.long)
    for k, block in enumerate(blocks):
        owner[torch.as_tensor(list(block), dtype=torch.long)] = k
    if bool((owner < 0).any()):
        raise ValueError("every output must belong to a part")
    part = owner[labels]
    scores = torch.stack([logits[:, list(b)].amax(1) for b in blocks], 1)  # (N, parts)
    routed = owner[logits.argmax(1)]
    masked = torch.full_like(logits, -torch.inf)
    own = owner[None, :] == part[:, None]
    masked[own] = logits[own]
    oracle = masked.argmax(1) == labels
    per_class = [float(oracle[labels == c].double().mean()) for c in range(n_out)
                 if bool((labels == c).any())]
    k_parts = len(blocks)
    one_vs_rest, pairs = {}, {}
    for k in range(k_parts):
        others = torch.cat([scores[:, :k], scores[:, k + 1:]], 1).amax(1) if k_parts > 1 \
            else torch.full((len(scores),), -torch.inf)
        margin = scores[:, k] - others
        if bool((part == k).any()) and bool((part != k).any()):
            one_vs_rest[str(k)] = auroc(margin[part == k], margin[part != k])
        for m in range(k + 1, k_parts):
            d = scores[:, k] - scores[:, m]
            if bool((part == k).any()) and bool((part == m).any()):
                pairs[f"{k}-{m}"] = auroc(d[part == k], d[part == m])
    return {"routing_accuracy": float((routed == part).double().mean()),
            "oracle_accuracy": float(oracle.double().mean()),
            "oracle_balanced_accuracy": sum(per_class) / len(per_class),
            "auroc_one_vs_rest": one_vs_rest, "auroc_pairs": pairs}
