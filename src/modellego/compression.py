"""Compression: a smaller model for *all* of a model's classes, without fine-tuning.

Three criteria choose the channels to remove:

``contribution`` (ours)
    the component of all the model's classes: disassembly with the contribution-mass rule,
    its thresholds searched for a FLOPs or parameter target, or for an accuracy budget on the
    validation split (see :mod:`modellego.analysis.search`).
``l1``
    L1-norm filter pruning: a channel's score is the L1 norm of the filter that writes it.
``fpgm``
    geometric-median pruning: a channel's score is the summed Euclidean distance of its
    filter to the other filters of the same layer; the filters nearest the geometric median
    are the most replaceable and go first.

``l1`` and ``fpgm`` prune the same fraction of every prunable channel space (the classical
uniform setting, up to one channel per space) and find it by bisection. A space coupled by
residual adds is written by several layers: a channel's score is the sum of its scores in
each writing layer, each layer's scores divided by their mean. Filters are scored as they
are, as in the original papers (a BatchNorm after a conv is sliced with it, not folded into
the score). Frozen spaces (image input, grouped convs) and the logits are never pruned, and
every space keeps at least one channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Sequence, cast

import torch
from torch import nn

from .analysis.candidates import Candidates
from .analysis.locate import LocateConfig
from .analysis.methods import get_method
from .analysis.search import Trial, first_passing
from .data.lazy import Inputs, as_tensor
from .disassembly import (
    Component,
    DisassemblyConfig,
    disassemble_model,
)
from .errors import ModelLegoError, PlanError
from .metrics import accuracy_from_logits, count_flops, count_params, predict_logits
from .models.attention import heads_of
from .registry import Registry
from .surgery.extract import apply_plan
from .surgery.graph import ChannelGraph, build_channel_graph
from .surgery.head import head_of
from .surgery.plan import ComponentPlan, plan_from_masks
from .surgery.recalibrate import recalibrate_batchnorm
from .surgery.reconstruct import SourceTargets, reconstruct_layers
from .training import task_outputs

#: the repairs ``compress`` applies by default, the best measured (``benchmarks/compression.py``):
#: every candidate's layers reading removed channels re-fitted on this many training images
#: of all classes ...
DEFAULT_RECONSTRUCT = 2000
#: ... then its BatchNorm statistics re-estimated on this many
DEFAULT_RECALIBRATE_BN = 2000
#: the criterion compress uses when none is given (docs/results.md, Compression, compares
#: the criteria, each with both repairs)
DEFAULT_CRITERION = "fpgm"


@dataclass(frozen=True)
class CompressConfig:
    """How to compress a model: a criterion and exactly one target."""

    #: one of :data:`CRITERIA` (default :data:`DEFAULT_CRITERION`)
    criterion: str = DEFAULT_CRITERION
    #: keep at most this share of the source's FLOPs ...
    target_flops: float | None = None
    #: ... or of its parameters ...
    target_params: float | None = None
    #: ... or lose at most this many points of validation accuracy
    max_accuracy_drop: float | None = None
    #: contribution only: training samples per class profiled
    samples_per_class: int = 50
    batch_size: int = 64
    #: contribution only: the disassembly method (see :data:`modellego.disassembly.METHODS`);
    #: ``contribution`` searches the mass rule's thresholds, the others their own defaults'
    method: str = "contribution"
    #: re-estimate the BatchNorm statistics of every candidate on this many training images of
    #: all classes (0: keep the source's); see :mod:`modellego.surgery.recalibrate`
    recalibrate_bn: int = DEFAULT_RECALIBRATE_BN
    #: re-fit the layers that read removed channels of every candidate on this many training
    #: images of all classes (0: off, the plain cut); see :mod:`modellego.surgery.reconstruct`
    reconstruct: int = DEFAULT_RECONSTRUCT

    def disassembly(self, classes: Sequence[int]) -> DisassemblyConfig:
        """The disassembly that makes the ``contribution`` compression of ``classes``."""
        locate = get_method(self.method).compress_locate()
        return DisassemblyConfig(tuple(classes), samples_per_class=self.samples_per_class,
                                 locate=locate, batch_size=self.batch_size, method=self.method,
                                 max_accuracy_drop=self.max_accuracy_drop,
                                 target_flops=self.target_flops,
                                 target_params=self.target_params,
                                 recalibrate_bn=self.recalibrate_bn,
                                 reconstruct=self.reconstruct, confidence=0.0,
                                 validation_per_class=0)

    def validate(self) -> None:
        if self.criterion not in CRITERION_REGISTRY:
            raise ModelLegoError(f"`criterion` {self.criterion!r} is unknown; use one of "
                                 f"{', '.join(CRITERIA)}")
        if (self.target_flops, self.target_params, self.max_accuracy_drop) == (None,) * 3:
            raise ModelLegoError("give a target: `target_flops` R or `target_params` R (a share "
                                 "of the source in (0, 1]) or `max_accuracy_drop` PP")
        self.disassembly(()).validate()  # ranges, method, and at most one target
        if self.method != "contribution" and self.criterion != "contribution":
            raise ModelLegoError(f"`method` {self.method} applies to `criterion` contribution "
                                 f"only, not {self.criterion}; pass `criterion` contribution")
        if get_method(self.method).head is not None:
            raise ModelLegoError(f"method {self.method!r} makes one-vs-rest modules, not a "
                                 "smaller classifier; compress with another method")

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "target_flops": self.target_flops,
                "target_params": self.target_params,
                "max_accuracy_drop": self.max_accuracy_drop,
                "samples_per_class": self.samples_per_class, "batch_size": self.batch_size,
                "method": self.method, "recalibrate_bn": self.recalibrate_bn,
                "reconstruct": self.reconstruct}


# --------------------------------------------------------------------------- channel scores


def prunable_spaces(graph: ChannelGraph, heads: bool = False) -> list[int]:
    """Spaces uniform pruning may shrink: written by a layer (with ``heads``, also the heads
    of attention layers), not frozen, not the logits, and of more than one channel."""
    written = {lay.out_space for lay in graph.layers} | \
        ({graph.find(s) for s in graph.attention.values()} if heads else set())
    return [s for s in graph.spaces() if s in written and s not in graph.frozen_spaces
            and s != graph.output_space and graph.space_size[s] > 1]


def filter_scores(filters: torch.Tensor, criterion: str) -> torch.Tensor:
    """One importance score per row of ``filters`` (higher = keep): the L1 norm (``l1``), or
    the summed Euclidean distance to the other rows (``fpgm``)."""
    return get_criterion(criterion).filter_scores(filters)


def channel_scores(graph: ChannelGraph, criterion: str, heads: bool = False
                   ) -> dict[int, torch.Tensor]:
    """Per prunable space, one float64 score per channel (higher = more important).

    Each layer writing the space adds its filter scores divided by their mean; with
    ``heads``, an attention layer's heads are scored by their q, k and v rows.
    """
    scores: dict[int, torch.Tensor] = {}
    writers = {graph.find(s): name for name, s in graph.attention.items()}
    for space in prunable_spaces(graph, heads):
        total = torch.zeros(graph.space_size[space], dtype=torch.float64)
        layout = heads_of(graph.model.get_submodule(writers[space])) if space in writers \
            else None
        if layout is not None:  # a space of heads, written by their q, k and v rows
            scores[space] = filter_scores(layout.filters().detach().double(), criterion)
            continue
        for lay in graph.layers:
            whole = len(lay.out_layout) == 1 and lay.out_layout[0].start == 0 and \
                lay.out_layout[0].size == graph.space_size[space]
            if lay.out_space != space or not whole:  # (a depthwise conv over part of it)
                continue
            w = lay.module.weight.detach().double()
            s = filter_scores(w.reshape(w.shape[0], -1), criterion)
            mean = s.mean()
            total += s / mean if mean > 0 else s
        scores[space] = total
    return scores


def masks_from_drops(graph: ChannelGraph, scores: dict[int, torch.Tensor],
                     drops: dict[int, int]) -> dict[int, torch.Tensor]:
    """Keep-masks of every space: ``drops[space]`` of its lowest-scored channels removed
    (ties: lower index first)."""
    masks = {s: torch.ones(graph.space_size[s], dtype=torch.bool) for s in graph.spaces()}
    for space, drop in drops.items():
        if drop > 0:
            masks[space][torch.sort(scores[space], stable=True).indices[:drop]] = False
    return masks


def uniform_masks(graph: ChannelGraph, scores: dict[int, torch.Tensor],
                  fraction: Fraction | float) -> dict[int, torch.Tensor]:
    """Keep-masks of every space: in each scored space, remove ``floor(fraction * size)`` of
    the lowest-scored channels, always keeping one."""
    fraction = Fraction(fraction)
    return masks_from_drops(graph, scores, {s: min(len(v) - 1, math.floor(fraction * len(v)))
                                            for s, v in scores.items()})


def removal_order(graph: ChannelGraph, heads: bool = False) -> list[tuple[Fraction, int]]:
    """Uniform pruning one channel at a time: ``(fraction, space)`` for every removable
    channel, where the ``k``-th channel of a space of ``n`` goes at fraction ``k / n``; in
    fraction order, ties in space order. The first ``m`` removals leave every space with
    the last one's fraction of its channels removed, up to one channel. ``heads``: attention
    heads are channels too."""
    spaces = prunable_spaces(graph, heads)
    events = sorted((Fraction(k, graph.space_size[s]), i) for i, s in enumerate(spaces)
                    for k in range(1, graph.space_size[s]))
    return [(f, spaces[i]) for f, i in events]


# --------------------------------------------------------------------------- uniform pruning


@dataclass(frozen=True)
class UniformPruning:
    """The result of uniform pruning: the smaller model and how it was chosen."""

    model: nn.Module
    plan: ComponentPlan
    graph: ChannelGraph = field(repr=False)
    criterion: str
    #: the share of channels removed from every prunable space (up to one channel)
    fraction: float
    flops_ratio: float
    params_ratio: float
    trials: tuple[dict, ...] = ()


def prune_uniform(model: nn.Module, input_shape: Sequence[int], criterion: str, *,
                  target_flops: float | None = None, target_params: float | None = None,
                  accuracy_of: Callable[[nn.Module], float] | None = None,
                  min_accuracy: float | None = None,
                  finish: Callable[[nn.Module, ComponentPlan], object] | None = None,
                  ) -> UniformPruning:
    """Remove the same fraction of channels from every prunable space of ``model``.

    With ``target_flops`` (or ``target_params``) it removes the fewest channels, in
    :func:`removal_order`, that leave at most that share of the source's FLOPs (parameters);
    with ``min_accuracy`` the most that keep ``accuracy_of(model)`` at it (accuracy assumed
    to fall as channels go). Both are found by bisection over the number of removals.
    ``finish(candidate, plan)`` (e.g. reconstruction, BatchNorm re-estimation) is applied to
    every pruned candidate before its accuracy is measured; with a cost target, to the
    chosen one only (a repair changes weights, not the cost).

    >>> small = prune_uniform(net, (1, 28, 28), "l1", target_flops=0.5).model
    """
    if sum(t is not None for t in (target_flops, target_params, min_accuracy)) != 1:
        raise ValueError("give exactly one of target_flops, target_params, min_accuracy")
    if min_accuracy is not None and accuracy_of is None:
        raise ValueError("min_accuracy needs accuracy_of")
    graph = build_channel_graph(model, tuple(input_shape))
    try:
        return _prune_uniform(model, input_shape, criterion, graph, False, target_flops,
                              target_params, accuracy_of, min_accuracy, finish)
    except _Unreachable as exc:
        if not graph.attention:
            raise ModelLegoError(str(exc)) from None
    # attention heads serve every class: pruned only when the target needs them (on the
    # shipped ViT at 60 % FLOPs, pruning them alike cost 10.4 pp against 6.0 pp)
    try:
        return _prune_uniform(model, input_shape, criterion, graph, True, target_flops,
                              target_params, accuracy_of, min_accuracy, finish)
    except _Unreachable as exc:
        raise ModelLegoError(str(exc)) from None


class _Unreachable(Exception):
    """Uniform pruning cannot reach its cost target (the message says why)."""


def _prune_uniform(model: nn.Module, input_shape: Sequence[int], criterion: str,
                   graph: ChannelGraph, heads: bool, target_flops: float | None,
                   target_params: float | None,
                   accuracy_of: Callable[[nn.Module], float] | None,
                   min_accuracy: float | None,
                   finish: Callable[[nn.Module, ComponentPlan], object] | None
                   ) -> UniformPruning:
    """:func:`prune_uniform` over ``graph``, attention heads pruned too with ``heads``."""
    scores = channel_scores(graph, criterion, heads)  # an unknown criterion fails first
    # a cost target does not depend on the repair (it changes weights, not shapes): only
    # the chosen candidate is repaired; an accuracy budget measures every candidate repaired
    cands = UniformCandidates(model, tuple(input_shape), graph, scores, finish,
                              price_repaired=min_accuracy is not None, heads=heads)
    trials: dict[int, Trial] = {}

    def measure(i: int, key: str) -> float:
        if i not in trials:
            ratios = {"flops_ratio": cands.flops_of(i), "params_ratio": cands.params_of(i)}
            accuracy = accuracy_of(cands.priced(i)) if accuracy_of is not None and \
                min_accuracy is not None else None
            trials[i] = Trial({"removed": i, "fraction": cands.fraction(i)}, ratios, accuracy)
        trial = trials[i]
        if key == "val_accuracy":
            return trial.accuracy if trial.accuracy is not None else 0.0
        return float(cast(float, trial.ratios[key]))

    n = len(cands.order) + 1
    if min_accuracy is not None:
        floor = min_accuracy
        i = max(0, first_passing(n, lambda j: measure(j, "val_accuracy") < floor) - 1)
    else:
        key, target = (("flops_ratio", target_flops) if target_flops is not None
                       else ("params_ratio", target_params))
        goal = cast(float, target)  # exactly one target was given: checked above
        i = first_passing(n, lambda j: measure(j, key) <= goal)
        if i == n:
            least = measure(n - 1, key)
            what = "FLOPs" if key == "flops_ratio" else "parameters"
            raise _Unreachable(
                f"{criterion}: even one channel per prunable layer keeps {100 * least:.1f} % "
                f"of the {what}, above the target {100 * goal:.1f} %; frozen layers (on the "
                "image input, grouped convs) and the logits cannot be pruned; choose a larger "
                "target")
    plan, small, _ = cands.build_fitted(i)
    return UniformPruning(small, plan, graph, criterion, cands.fraction(i),
                          measure(i, "flops_ratio"), measure(i, "params_ratio"),
                          tuple(t.to_dict() for _, t in sorted(trials.items())))


class UniformCandidates(Candidates[int]):
    """Uniform pruning's candidates, keyed by how many channels of :func:`removal_order`
    are removed; ``finish(network, plan)`` repairs one (see
    :class:`~modellego.analysis.candidates.Candidates`)."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], graph: ChannelGraph,
                 scores: dict[int, torch.Tensor],
                 finish: Callable[[nn.Module, ComponentPlan], object] | None, *,
                 price_repaired: bool, heads: bool = False) -> None:
        super().__init__(model, input_shape, price_repaired=price_repaired)
        self.graph, self.scores, self.finish = graph, scores, finish
        self.order = removal_order(graph, heads)

    def fraction(self, removed: int) -> float:
        """The share of every space's channels the first ``removed`` removals take."""
        return float(self.order[removed - 1][0]) if removed else 0.0

    def plan(self, key: int) -> ComponentPlan:
        drops = {s: 0 for s in self.scores}
        for _, s in self.order[:key]:
            drops[s] += 1
        graph = self.graph
        return plan_from_masks(graph, masks_from_drops(graph, self.scores, drops),
                               range(graph.space_size[graph.output_space]))

    def make(self, plan: ComponentPlan, repair: bool) -> tuple[nn.Module, None]:
        small = apply_plan(self.model, plan).eval()
        if self.finish is not None and repair:
            self.finish(small, plan)
        return small, None


# --------------------------------------------------------------------------- any criterion


@dataclass(frozen=True)
class Compressed:
    """A compressed model, its plan and what chose it."""

    model: nn.Module
    plan: ComponentPlan
    graph: ChannelGraph = field(repr=False)
    criterion: str
    #: l1/fpgm: the share of channels removed from every prunable space
    fraction: float | None = None
    #: contribution: the locating thresholds chosen
    locate: LocateConfig | None = None
    #: the candidates tried (threshold search or bisection steps)
    trials: tuple[dict, ...] = ()
    component: Component | None = field(default=None, repr=False)


def compress_model(model: nn.Module, input_shape: Sequence[int], *,
                   output_classes: Sequence[int], config: CompressConfig,
                   images: Inputs | None = None, labels: torch.Tensor | None = None,
                   val_images: Inputs | None = None,
                   val_labels: torch.Tensor | None = None,
                   calibration_images: torch.Tensor | None = None) -> Compressed:
    """Compress ``model`` (logit ``i`` = class ``output_classes[i]``) for all its classes.

    Args:
        model: the network (logit ``i`` answers class ``output_classes[i]``).
        input_shape: ``(C, H, W)`` of one input.
        output_classes: the class id of each logit.
        config: the compression target and method.
        images: normalised training inputs (the criterion ``contribution``, reconstruction).
        labels: their class ids.
        val_images: normalised validation inputs (a ``max_accuracy_drop`` target).
        val_labels: their class ids.
        calibration_images: normalised training inputs for ``recalibrate_bn``.

    Returns:
        A :class:`~modellego.compression.Compressed`: the network, its plan, the ratios and
        the search's trials.

    ``contribution`` needs normalised training ``images``/``labels``; a
    ``max_accuracy_drop`` target needs ``val_images``/``val_labels``; ``recalibrate_bn``
    needs ``calibration_images``; ``reconstruct`` needs ``images`` (of all classes). Both
    repairs are on by default (:data:`DEFAULT_RECONSTRUCT`, :data:`DEFAULT_RECALIBRATE_BN`);
    ``reconstruct=0, recalibrate_bn=0`` is the plain cut, which needs no images.

    >>> small = compress_model(net, (1, 28, 28), output_classes=range(10), images=x,
    ...                        calibration_images=x,
    ...                        config=CompressConfig("l1", target_flops=0.5)).model
    """
    config.validate()
    _, output_classes = task_outputs(output_classes, output_classes)
    if head_of(model) is not None:
        raise ModelLegoError(f"the model carries a {head_of(model)} head (a pan-rajan module); "
                             "compress its source model instead")
    if config.max_accuracy_drop is not None and (val_images is None or val_labels is None):
        raise ModelLegoError("`max_accuracy_drop` needs `val_images` and `val_labels`")
    if config.recalibrate_bn and calibration_images is None:
        raise ModelLegoError("`recalibrate_bn` needs `calibration_images` (training images of "
                             "all classes); pass recalibrate_bn=0 to keep the source's "
                             "statistics")
    if config.reconstruct and images is None:
        raise ModelLegoError("`reconstruct` needs `images` (training images of all classes); "
                             "pass reconstruct=0 for the plain cut")
    return get_criterion(config.criterion).compress(
        model, tuple(input_shape), output_classes, config, images=images, labels=labels,
        val_images=val_images, val_labels=val_labels, calibration_images=calibration_images)


# --------------------------------------------------------------------------- criteria


class Criterion:
    """How compression chooses the channels to remove; one subclass per criterion."""

    name: str = ""
    #: ``compress_model`` needs the training images (and labels) of every class
    needs_training_images = False

    def filter_scores(self, filters: torch.Tensor) -> torch.Tensor:
        """One importance score per row of ``filters`` (higher = keep)."""
        raise ModelLegoError(f"criterion {self.name!r} has no filter score; use l1 or fpgm")

    def compress(self, model: nn.Module, input_shape: tuple[int, ...],
                 output_classes: list[int], config: CompressConfig, *,
                 images: Inputs | None, labels: torch.Tensor | None,
                 val_images: Inputs | None, val_labels: torch.Tensor | None,
                 calibration_images: torch.Tensor | None) -> Compressed:
        """The compressed model (inputs already checked by :func:`compress_model`)."""
        raise NotImplementedError


class UniformCriterion(Criterion):
    """Score every channel group by its writers' filters; prune every group alike."""

    def compress(self, model, input_shape, output_classes, config, *, images, labels,
                 val_images, val_labels, calibration_images):
        accuracy_of, min_accuracy = None, None
        if config.max_accuracy_drop is not None:
            def accuracy_of(net: nn.Module) -> float:
                return accuracy_from_logits(predict_logits(net, val_images), val_labels,
                                            output_classes).accuracy

            min_accuracy = accuracy_of(model) - config.max_accuracy_drop / 100
        graph = build_channel_graph(model, input_shape) if config.reconstruct else None
        if graph is not None and images is not None:  # (compress_model checked the images)
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
            fit_images = as_tensor(images[order[:config.reconstruct]])

        targets = SourceTargets()  # the source's outputs, measured once for every candidate

        def finish(net: nn.Module, plan: ComponentPlan) -> None:
            # the repairs in disassembly's order: reconstruction, then BN statistics
            if graph is not None:
                reconstruct_layers(net, model, graph, plan, fit_images, cache=targets)
            if config.recalibrate_bn:
                recalibrate_batchnorm(net, calibration_images)

        res = prune_uniform(model, input_shape, self.name, target_flops=config.target_flops,
                            target_params=config.target_params, accuracy_of=accuracy_of,
                            min_accuracy=min_accuracy,
                            finish=finish if config.recalibrate_bn or config.reconstruct
                            else None)
        return Compressed(res.model, res.plan, res.graph, self.name, fraction=res.fraction,
                          trials=res.trials)


class L1(UniformCriterion):
    """L1-norm filter pruning."""

    name = "l1"

    def filter_scores(self, filters: torch.Tensor) -> torch.Tensor:
        return filters.abs().sum(1)


class FPGM(UniformCriterion):
    """Geometric-median pruning: the filters nearest the others go first."""

    name = "fpgm"

    def filter_scores(self, filters: torch.Tensor) -> torch.Tensor:
        return torch.cdist(filters, filters, compute_mode="donot_use_mm_for_euclid_dist").sum(1)


class ContributionCriterion(Criterion):
    """The component of all the model's classes (disassembly with a threshold search)."""

    name = "contribution"
    needs_training_images = True

    def compress(self, model, input_shape, output_classes, config, *, images, labels,
                 val_images, val_labels, calibration_images):
        if images is None or labels is None:
            raise ModelLegoError("criterion 'contribution' needs training images")
        try:
            comp = disassemble_model(model, images, labels, classes=output_classes,
                                     output_classes=output_classes,
                                     config=config.disassembly(output_classes),
                                     val_images=val_images, val_labels=val_labels,
                                     calibration_images=calibration_images)
        except PlanError as exc:
            if config.max_accuracy_drop is not None:
                raise
            raise PlanError(f"contribution: no threshold of the searched family reaches the "
                            f"target ({str(exc).split(';')[0]} at the most aggressive one); "
                            "choose a larger target") from None
        _check_reached(model, comp.model, input_shape, config)
        return Compressed(comp.model, comp.plan, comp.graph, "contribution", locate=comp.locate,
                          trials=comp.search, component=comp)


#: every compression criterion, by name, in the order the CLI lists them
CRITERION_REGISTRY: Registry[Criterion] = Registry("pruning criterion")
for _criterion in (ContributionCriterion(), L1(), FPGM()):
    CRITERION_REGISTRY.register(_criterion.name, _criterion)
#: the registered criteria's names
CRITERIA = CRITERION_REGISTRY.names()


def get_criterion(name: str) -> Criterion:
    """The criterion registered as ``name``; a one-line error lists the known ones."""
    return CRITERION_REGISTRY.get(name)


def _check_reached(model: nn.Module, small: nn.Module, input_shape: Sequence[int],
                   config: CompressConfig) -> None:
    """Refuse a contribution component above its cost target (the search found none under)."""
    for flag, target, ratio in (
            ("`target_flops`", config.target_flops,
             lambda: count_flops(small, input_shape) / count_flops(model, input_shape)),
            ("`target_params`", config.target_params,
             lambda: count_params(small) / count_params(model))):
        if target is not None and (reached := ratio()) > target:
            raise ModelLegoError(
                f"contribution: the most aggressive threshold of the searched family keeps "
                f"{100 * reached:.1f} %, above {flag} {target}; choose a larger target")
