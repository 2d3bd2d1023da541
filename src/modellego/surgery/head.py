"""Component heads: what a component computes from its logits before it answers.

A component without a head answers with its logits. The ``one-vs-rest`` head (Pan & Rajan's
binary concern head) answers, for each of its ``n`` classes, with the *concern score*::

    score_i(x) = logit_i(x) - logsumexp_{j != i} logit_j(x)        (i < n)

over *all* the network's logits: the log-odds of "x is class i" against every other class of
the source. Positive means the module claims x. The network's first ``n`` logits are the
component's classes in order, so a manifest says all of it with ``"head": "one-vs-rest"``
and its class list: the head is plain data and carries no weights. Computed in float64 (the
log-odds of confident samples are the difference of two close numbers), returned in the
logits' dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import Registry

#: the value of a component manifest's optional ``"head"`` key
ONE_VS_REST = "one-vs-rest"


def one_vs_rest(logits: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` concern scores of the first ``n`` of ``logits`` (B, m), ``m >= 2``."""
    z = logits.double()
    cols = [z[:, i] - torch.logsumexp(torch.cat([z[:, :i], z[:, i + 1:]], 1), 1)
            for i in range(n)]
    return torch.stack(cols, 1).to(logits.dtype)


class OneVsRest(nn.Module):
    """``net`` followed by the one-vs-rest head over its first ``num_classes`` logits."""

    head = ONE_VS_REST

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_vs_rest(self.net(x), self.num_classes)


#: head name -> ``(net, num_classes) -> module``
HEAD_REGISTRY: Registry = Registry("component head")
HEAD_REGISTRY.register(ONE_VS_REST, OneVsRest)


def apply_head(net: nn.Module, head: str | None, num_classes: int) -> nn.Module:
    """``net`` with the named head (``None``: no head, ``net`` itself)."""
    if head is None:
        return net
    return HEAD_REGISTRY.get(head)(net, num_classes)


def head_of(model: nn.Module) -> str | None:
    """The head a component model carries, or ``None``."""
    return getattr(model, "head", None) if isinstance(model, OneVsRest) else None
