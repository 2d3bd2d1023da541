"""Routing metrics on tiny hand-made cases, with values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from modellego.assembly.routing import auroc, routing_metrics
from modellego.assembly.scoring import balancing_weights, fit_joint_router


def test_auroc_counts_pairs_and_half_ties() -> None:
    # pairs (p, n): (3,1) (3,2) (2,1) win, (2,2) ties: 3.5 of 4
    assert auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == 0.875
    assert auroc(torch.tensor([1.0]), torch.tensor([0.0, -5.0])) == 1.0
    assert auroc(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0, 3.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    # every tie: 0.5; ranks of repeated values are averaged across both sides
    assert auroc(torch.tensor([5.0, 1.0, 5.0]), torch.tensor([5.0, 1.0])) == pytest.approx(
        (0.5 + 1 + 0 + 0.5 + 0.5 + 1) / 6)
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auroc(torch.tensor([]), torch.tensor([1.0]))


def test_routing_metrics_of_two_parts() -> None:
    """Outputs 0, 1 belong to part 0 and 2, 3 to part 1. Image by image:
    0: class 0, block maxima (5, 1): routed right, classified right
    1: class 1, maxima (4, 6): routed to part 1 (wrong); within part 0 it says 1 (right)
    2: class 2, maxima (2, 3): routed right, but part 1 says 3 (wrong)
    3: class 3, maxima (7, 1): routed wrong; within part 1 it says 3 (right)
    """
    logits = torch.tensor([[5.0, 0.0, 1.0, 0.0],
                           [0.0, 4.0, 6.0, 0.0],
                           [0.0, 2.0, 1.0, 3.0],
                           [7.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2, 3])
    m = routing_metrics(logits, labels, [[0, 1], [2, 3]])
    assert m["routing_accuracy"] == 0.5
    assert m["oracle_accuracy"] == 0.75 and m["oracle_balanced_accuracy"] == 0.75
    # margins s0 - s1 by image: 4, -2, -1, 6. Part 0 vs rest: positives (4, -2) against
    # negatives (-1, 6): only 4 > -1 of the 4 pairs. Part 1 (margins negated) the same.
    assert m["auroc_one_vs_rest"] == {"0": 0.25, "1": 0.25}
    assert m["auroc_pairs"] == {"0-1": 0.25}
    perfect = routing_metrics(torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 3.0]]),
                              torch.tensor([0, 3]), [[0, 1], [2, 3]])
    assert perfect["routing_accuracy"] == 1.0 and perfect["auroc_pairs"] == {"0-1": 1.0}


def test_three_parts_one_vs_rest_and_pairs() -> None:
    # one output per part; the score of a part is its logit
    logits = torch.tensor([[3.0, 1.0, 0.0],   # part 0's image
                           [0.0, 2.0, 1.0],   # part 1's
                           [0.0, 2.0, 1.5],   # part 2's: routed to part 1
                           [1.0, 0.0, 4.0]])  # part 2's
    labels = torch.tensor([0, 1, 2, 2])
    m = routing_metrics(logits, labels, [[0], [1], [2]])
    assert m["routing_accuracy"] == 0.75
    assert m["oracle_accuracy"] == 1.0  # one class per part: perfect routing is perfect
    # part 2 vs rest: margins s2 - max(s0, s1): positives -0.5, 3; negatives -3, -1
    assert m["auroc_one_vs_rest"]["2"] == 1.0
    # pair 1-2 on images 1, 2, 3: d = s1 - s2: positives (1.0), negatives (0.5, -4): 1.0
    assert m["auroc_pairs"] == {"0-1": 1.0, "0-2": 1.0, "1-2": 1.0}
    with pytest.raises(ValueError, match="every output must belong to a part"):
        routing_metrics(logits, labels, [[0], [1]])


def test_balancing_weights_give_every_group_the_same_total() -> None:
    w = balancing_weights(torch.tensor([0, 0, 0, 5, 5, 9]))
    # 1/3, 1/3, 1/3, 1/2, 1/2, 1 scaled to mean 1 (their mean is 1/2)
    assert torch.allclose(w, torch.tensor([2 / 3, 2 / 3, 2 / 3, 1.0, 1.0, 2.0],
                                          dtype=torch.float64))
    assert float(w[:3].sum()) == pytest.approx(float(w[3:5].sum())) == pytest.approx(2.0)


def test_weighted_joint_router_equals_the_fit_on_repeated_images() -> None:
    """Weight 2 on an image is the same objective as that image twice (the loss is
    mean-normalised by the weights), so both fits reach the same optimum."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(30, 4, generator=g, dtype=torch.float64)
    owner = torch.randint(0, 3, (30,), generator=g)
    weights = torch.ones(30, dtype=torch.float64)
    weights[:7] = 2.0
    w1, b1 = fit_joint_router(z, owner, 1e-2, weights=weights)
    rep = torch.cat([z, z[:7]])
    w2, b2 = fit_joint_router(rep, torch.cat([owner, owner[:7]]), 1e-2)
    assert torch.allclose(w1, w2, atol=1e-6) and torch.allclose(b1, b2, atol=1e-6)
    # and the weights do change the fit
    w0, _ = fit_joint_router(z, owner, 1e-2)
    assert not torch.allclose(w0, w1, atol=1e-3)
