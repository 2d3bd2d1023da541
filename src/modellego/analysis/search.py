"""Automatic thresholds: walk a one-parameter family of locating thresholds, from the most
to the least aggressive, and pick the first that meets a target on the validation split."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import PlanError
from .locate import LocateConfig

# Most aggressive first. For the mass rule the knob is the dropped share of contribution mass;
# for the count rule it scales the paper's alpha/beta defaults.
MASS_STEPS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1,
              0.08, 0.06, 0.05, 0.04, 0.03, 0.02, 0.015, 0.01, 0.007, 0.005, 0.003, 0.002,
              0.001, 0.0)
#: the dropped shares a FLOPs or parameter target also walks (candidates are priced as cut,
#: which is cheap): above 0.5 the steps of :data:`MASS_STEPS` leave gaps of 15-20 points of
#: FLOPs between neighbours
FINE_MASS_STEPS = tuple(round(0.95 - 0.025 * i, 3) for i in range(19))  # 0.95 ... 0.5
COUNT_SCALES = (2.0, 1.5, 1.25, 1.0, 0.8, 0.6, 0.45, 0.33, 0.25, 0.18, 0.12, 0.08, 0.05, 0.02,
                0.0)
FRAT_SCALES = COUNT_SCALES


def alpha_family(base: LocateConfig, scales: Sequence[float] = FRAT_SCALES
                 ) -> list[LocateConfig]:
    """``base`` with ``alpha_conv`` and ``alpha_linear`` scaled by each of ``scales``."""
    return [replace(base, alpha_conv=min(1.0, base.alpha_conv * f),
                    alpha_linear=min(1.0, base.alpha_linear * f)) for f in scales]


def rule_family(base: LocateConfig) -> list[LocateConfig]:
    """The contribution family of ``base.rule``: the mass rule's dropped shares
    (:data:`MASS_STEPS`), or the count rule's alphas and betas scaled by
    :data:`COUNT_SCALES`."""
    if base.rule == "mass":
        return [replace(base, beta_conv=t, beta_linear=t) for t in MASS_STEPS]
    return [replace(base, alpha_conv=min(1.0, base.alpha_conv * f),
                    beta_conv=min(1.0, base.beta_conv * f),
                    alpha_linear=min(1.0, base.alpha_linear * f),
                    beta_linear=min(1.0, base.beta_linear * f)) for f in COUNT_SCALES]


def cost_family(family: Sequence[LocateConfig]) -> list[LocateConfig]:
    """``family`` for a cost target: a mass-rule family gets :data:`FINE_MASS_STEPS` too
    (most aggressive first); others are returned as they are."""
    if not family or any(c.rule != "mass" or c.layer_beta or c.beta_conv != c.beta_linear
                         for c in family):
        return list(family)
    steps = sorted({c.beta_conv for c in family} | set(FINE_MASS_STEPS), reverse=True)
    return [replace(family[0], beta_conv=t, beta_linear=t) for t in steps]


def first_passing(n: int, passes: Callable[[int], bool], *, top_first: bool = False) -> int:
    """The first ``i`` in ``range(n)`` for which ``passes(i)`` holds, by bisection, for a
    ``passes`` that is false and then true along the range; ``n`` when it never holds.

    ``top_first``: probe the last index first and stop there when it fails (nothing before
    it can pass): one probe settles a range that is expected to fail whole.

    Every search of the package (threshold families, uniform pruning) goes through this one
    helper, so they probe candidates in the same order."""
    lo, hi = 0, n
    if top_first and n:
        if not passes(n - 1):
            return n
        hi = n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def cheaper_candidates(family: Sequence[LocateConfig], cost_of: Callable[[LocateConfig], float],
                       limit: float) -> list[LocateConfig]:
    """The candidates of ``family`` (most aggressive first) whose cost is finite and less
    than ``limit``, found by bisection on ``cost_of`` (the plain cut's cost; ``inf`` for a
    cut that empties a layer): a family's kept sets grow along it and so do its costs, the
    most aggressive possibly infinite, so those candidates are one run of it. About
    2 log2(len(family)) costs are asked for instead of all of them."""
    costs: dict[int, float] = {}

    def cost(i: int) -> float:
        if i not in costs:
            costs[i] = cost_of(family[i])
        return costs[i]

    first = first_passing(len(family), lambda i: cost(i) < math.inf)
    if math.isinf(limit):
        return list(family[first:])
    end = first + first_passing(len(family) - first, lambda j: cost(first + j) >= limit)
    return list(family[first:end])


@dataclass(frozen=True)
class Trial:
    """One candidate a search measured: what it was (plain data), its cost ratios, and, when
    an accuracy budget was searched, its validation accuracy.

    ``verdict`` is ``True``/``False`` where the search judged the candidate against its target
    (threshold searches record it with a ``note``); ``None`` where the caller judges it from
    the numbers (uniform pruning's bisection)."""

    candidate: Mapping[str, Any]
    ratios: Mapping[str, float | None]
    accuracy: float | None = None
    verdict: bool | None = None
    note: str = ""
    #: the threshold configuration tried, for threshold searches
    config: LocateConfig | None = None

    @property
    def ok(self) -> bool:
        return bool(self.verdict)

    @classmethod
    def of_thresholds(cls, config: LocateConfig, ratio: float | None, accuracy: float | None,
                      ok: bool, note: str = "", cost: str = "flops") -> Trial:
        """A trial of locating thresholds; ``cost`` names what ``ratio`` measures."""
        return cls({"locate": config.to_dict()}, {f"{cost}_ratio": ratio}, accuracy, ok, note,
                   config)

    def to_dict(self) -> dict:
        out = {**self.candidate, **self.ratios}
        if self.verdict is not None:
            out.update({"val_accuracy": self.accuracy, "ok": self.verdict, "note": self.note})
        elif self.accuracy is not None:
            out["val_accuracy"] = self.accuracy
        return out


@dataclass(frozen=True)
class PairedDrop:
    """How much a component loses against its source on the same ``n`` images, paired:
    ``lost`` images the source gets right and the component wrong, ``gained`` the reverse.

    ``drop = (lost - gained) / n`` is the observed loss (a fraction); ``upper(confidence)``
    is its one-sided upper confidence bound, ``drop + z * se`` with ``z`` the normal
    quantile and ``se`` the standard error of the mean of the per-image differences
    (``-1, 0, +1``): ``sqrt(((lost + gained) / n - drop^2) / n)``. Images on which both
    agree carry no uncertainty, so a candidate that changes no prediction has bound 0
    whatever ``n`` is; ``1 / n`` is the resolution of one image."""

    n: int
    lost: int
    gained: int

    @classmethod
    def of(cls, source_correct: torch.Tensor, component_correct: torch.Tensor) -> PairedDrop:
        if source_correct.shape != component_correct.shape or source_correct.ndim != 1:
            raise ValueError("the paired flags must be two vectors of one length")
        s, c = source_correct.bool(), component_correct.bool()
        return cls(int(len(s)), int((s & ~c).sum()), int((~s & c).sum()))

    @property
    def drop(self) -> float:
        return (self.lost - self.gained) / self.n if self.n else 0.0

    def upper(self, confidence: float) -> float:
        if not self.n:
            return math.inf
        z = NormalDist().inv_cdf(confidence)
        var = max(0.0, (self.lost + self.gained) / self.n - self.drop ** 2) / self.n
        return self.drop + z * math.sqrt(var)


def search(family: Sequence[LocateConfig], flops_of: Callable[[LocateConfig], float],
           accuracy_of: Callable[[LocateConfig], float] | None, *,
           min_accuracy: float | None = None, max_flops_ratio: float | None = None,
           cost: str = "flops",
           judge: Callable[[LocateConfig], tuple[float, bool, str]] | None = None,
           bisect: int = 0, top_first: bool = False, min_gain: float = 0.0,
           ) -> tuple[LocateConfig, list[Trial]]:
    """Pick thresholds from ``family`` (most aggressive first) for one target.

    ``min_accuracy``: binary search (accuracy assumed to grow along the family) for the most
    aggressive candidate whose validation accuracy reaches it; falls back to the least
    aggressive. Then ``bisect`` times the gap between that candidate and its failing
    neighbour (more aggressive) is halved (:func:`midpoint` of their thresholds) and the
    midpoint measured, so the result may lie between two steps of the family.
    ``max_flops_ratio``: the least aggressive candidate under the FLOPs target.
    ``cost="params"`` says that ``flops_of`` measures the parameter ratio instead, and
    ``max_flops_ratio`` is then a parameter target (trials record ``params_ratio``).

    ``judge``: instead of ``min_accuracy``, a candidate passes when ``judge(config)``
    says so; it returns ``(validation accuracy, passes, note)`` (the same binary search).
    ``min_gain``: a halving is measured only while the passing candidate costs at least
    this much more than its failing neighbour (the most a halving can win), or less (costs
    that do not grow along the family: what a halving wins is unknown).
    ``top_first``: the least aggressive candidate is measured first, and when it fails the
    search stops there (see :func:`first_passing`): for a family that must beat a result
    found earlier, cut to the candidates that could.

    ``flops_of`` raises :class:`PlanError` for candidates that empty a layer.
    """
    trials: list[Trial] = []
    cache: dict[LocateConfig, bool] = {}
    ratios: dict[LocateConfig, float] = {}

    def passes(i: int) -> bool:
        return measured(family[i])

    def measured(cfg: LocateConfig) -> bool:
        if cfg in cache:
            return cache[cfg]
        try:
            ratio = flops_of(cfg)
        except PlanError as exc:
            trials.append(Trial.of_thresholds(cfg, None, None, False, str(exc).split(";")[0],
                                              cost))
            cache[cfg] = False
            return False
        ratios[cfg] = ratio
        acc, note = None, ""
        ok = max_flops_ratio is None or ratio <= max_flops_ratio
        if judge is not None:
            acc, passed, note = judge(cfg)
            ok = ok and passed
        elif min_accuracy is not None and accuracy_of is not None:
            acc = accuracy_of(cfg)
            ok = ok and acc >= min_accuracy
        trials.append(Trial.of_thresholds(cfg, ratio, acc, ok, note, cost=cost))
        cache[cfg] = ok
        return ok

    if (max_flops_ratio is None) == (min_accuracy is None and judge is None):
        raise ValueError("give exactly one target: min_accuracy (or judge) or max_flops_ratio")
    if max_flops_ratio is not None:
        # FLOPs cost no data: scan from the least aggressive end for the first under target
        for i in reversed(range(len(family))):
            if passes(i):
                return family[i], trials
        return family[0], trials
    best = first_passing(len(family), passes, top_first=top_first)
    if not 0 < best < len(family):  # the most aggressive passes, or none does
        return family[min(best, len(family) - 1)], trials
    failing, passing = family[best - 1], family[best]  # the bisection measured both
    for _ in range(bisect):
        mid = midpoint(failing, passing)
        gap = ratios[passing] - ratios[failing] if failing in ratios else math.inf
        if mid is None or 0 <= gap < min_gain:
            break
        if measured(mid):
            passing = mid
        else:
            failing = mid
    return passing, trials


#: the thresholds :func:`midpoint` interpolates
THRESHOLDS = ("alpha_conv", "beta_conv", "alpha_linear", "beta_linear")


def midpoint(a: LocateConfig, b: LocateConfig) -> LocateConfig | None:
    """The thresholds halfway between ``a`` and ``b`` (each of :data:`THRESHOLDS` averaged,
    rounded to 5 decimals), for two neighbours of one family: ``None`` when they differ in
    anything else (rule, normalisation, per-layer betas) or the midpoint is one of them."""
    if replace(a, **{f: getattr(b, f) for f in THRESHOLDS}) != b:
        return None
    mid = replace(a, **{f: round((getattr(a, f) + getattr(b, f)) / 2, 5) for f in THRESHOLDS})
    return None if mid in (a, b) else mid


def refine(start: LocateConfig, layers: Sequence[tuple[str, float]],
           flops_of: Callable[[LocateConfig], float],
           accuracy_of: Callable[[LocateConfig], float] | None,
           min_accuracy: float | None, *, steps: Sequence[float] = (0.3, 0.15, 0.07),
           judge: Callable[[LocateConfig], tuple[float, bool, str]] | None = None,
           ) -> tuple[LocateConfig, list[Trial]]:
    """Greedy per-layer tightening after a global search: for each ``(layer, its beta)`` in
    ``layers`` (most expensive first), raise the layer's beta by the largest step that keeps
    the validation accuracy at ``min_accuracy`` (or that ``judge`` passes, as in
    :func:`search`)."""
    trials: list[Trial] = []
    current = start
    for name, base in layers:
        betas = dict(current.layer_beta)
        now = betas.get(name, base)
        for step in steps:
            beta = min(0.95, now + step)
            if beta <= now:
                continue
            cfg = replace(current, layer_beta=tuple(sorted({**betas, name: beta}.items())))
            try:
                ratio = flops_of(cfg)
            except PlanError as exc:
                trials.append(Trial.of_thresholds(cfg, None, None, False, str(exc).split(";")[0]))
                continue
            if judge is not None:
                acc, ok, note = judge(cfg)
            elif accuracy_of is not None and min_accuracy is not None:
                acc, note = accuracy_of(cfg), ""
                ok = acc >= min_accuracy
            else:
                raise ValueError("refine needs min_accuracy and accuracy_of, or judge")
            trials.append(Trial.of_thresholds(cfg, ratio, acc, ok,
                                              f"refine {name}" + (f": {note}" if note else "")))
            if ok:
                current = cfg
                break
    return current, trials
