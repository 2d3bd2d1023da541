"""The candidates of a search: each is cut from the source by its plan, repaired as asked,
priced and judged, and the work is done once per candidate. Disassembly's threshold search
(:class:`modellego.disassembly.TaskCandidates`, keyed by locating thresholds) and uniform
pruning's bisection (:func:`modellego.compression.prune_uniform`, keyed by the number of
channels removed) are the two searches over such candidates."""

from __future__ import annotations

import functools
from typing import Any, Generic, Hashable, Sequence, TypeVar

from torch import nn

from ..metrics import count_flops, count_params
from ..surgery.extract import apply_plan
from ..surgery.plan import ComponentPlan

K = TypeVar("K", bound=Hashable)


class Candidates(Generic[K]):
    """Candidates of ``model`` by key: :meth:`plan` says what a key keeps, :meth:`make`
    cuts (and, when asked, repairs) the network. The latest ``keep`` built are kept (a
    search measures a candidate's cost, then its accuracy, then returns the last that
    passed: each is cut and repaired once).

    With ``price_repaired`` a candidate's cost is measured on the repaired network (the
    one whose accuracy is judged); without (a cost target alone), on the plain cut, since a
    repair changes weights and not the cost, and only the chosen one is repaired. Costs are
    kept per key (a search compares its results' costs after building others).

    :meth:`pin` keeps one built candidate until another is pinned (a search's best so
    far, so that returning it does not cut and repair it again); it is one of the ``keep``
    networks held, the others the latest built.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], *,
                 price_repaired: bool, keep: int = 2) -> None:
        self.model, self.input_shape = model, tuple(input_shape)
        self.price_repaired, self.keep = price_repaired, keep
        self.built: dict[tuple[K, bool], tuple[ComponentPlan, nn.Module, Any]] = {}
        self.pinned: dict[tuple[K, bool], tuple[ComponentPlan, nn.Module, Any]] = {}
        self.costs: dict[tuple[str, K], float] = {}

    def plan(self, key: K) -> ComponentPlan:
        """What candidate ``key`` keeps of the source."""
        raise NotImplementedError

    def make(self, plan: ComponentPlan, repair: bool) -> tuple[nn.Module, Any]:
        """The network of ``plan`` (repaired when ``repair``) and what its repair fitted."""
        return apply_plan(self.model, plan).eval(), None

    def build_fitted(self, key: K, repair: bool = True
                     ) -> tuple[ComponentPlan, nn.Module, Any]:
        """Candidate ``key``: its plan, its network and what its repair fitted;
        ``repair=False``: the plain cut (its cost is the same)."""
        if (key, repair) in self.pinned:
            return self.pinned[key, repair]
        if (key, repair) not in self.built:
            plan = self.plan(key)
            net, fit = self.make(plan, repair)
            # at most ``keep`` networks held, the pinned one included
            while self.built and len(self.built) + len(self.pinned) >= self.keep:
                self.built.pop(next(iter(self.built)))
            self.built[key, repair] = (plan, net, fit)
        return self.built[key, repair]

    def pin(self, key: K) -> None:
        """Keep repaired candidate ``key`` (built now if it is not) until another is pinned;
        it counts among the ``keep`` networks held."""
        entry = self.build_fitted(key)
        self.built.pop((key, True), None)
        self.pinned = {(key, True): entry}

    def build(self, key: K) -> nn.Module:
        """The repaired network of candidate ``key``."""
        return self.build_fitted(key)[1]

    def priced(self, key: K) -> nn.Module:
        """The network of candidate ``key`` its cost is measured on."""
        return self.build_fitted(key, self.price_repaired)[1]

    @functools.cached_property
    def source_flops(self) -> int:
        return count_flops(self.model, self.input_shape)

    @functools.cached_property
    def source_params(self) -> int:
        return count_params(self.model)

    def flops_of(self, key: K) -> float:
        """Candidate ``key``'s share of the source's FLOPs."""
        if ("flops", key) not in self.costs:
            self.costs["flops", key] = count_flops(self.priced(key), self.input_shape) / \
                self.source_flops
        return self.costs["flops", key]

    def params_of(self, key: K) -> float:
        """Candidate ``key``'s share of the source's parameters."""
        if ("params", key) not in self.costs:
            self.costs["params", key] = count_params(self.priced(key)) / self.source_params
        return self.costs["params", key]
