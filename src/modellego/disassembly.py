"""Disassembly: sample selection -> contribution profile -> locating -> extraction -> report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Callable, Mapping, Sequence, cast

import torch
from torch import nn

from .analysis.candidates import Candidates
from .analysis.locate import (
    LocateConfig,
    layer_heads,
    locate_class,
    profiled_layers,
    union_of_class_masks,
)
from .analysis.methods import METHOD_REGISTRY, USE_MASS_RULE, Method, Profile, get_method
from .analysis.profile import (  # noqa: F401  (tests patch contribution_profile here)
    ContributionProfile,
    SampleSelection,
    contribution_profile,
    select_samples,
    take_every_sample,
)
from .analysis.search import PairedDrop, Trial, cheaper_candidates, cost_family, refine, search
from .data.lazy import Inputs, ModelInputs, as_tensor, default_batch, max_memory, take
from .errors import ModelLegoError, PlanError
from .metrics import (
    accuracy_from_logits,
    correct_flags,
    count_flops,
    macs_by_layer,
    predict_logits,
)
from .runtime.distributed import DistContext
from .surgery.extract import apply_plan, compensate_removed_inputs
from .surgery.graph import ChannelGraph, build_channel_graph
from .surgery.head import head_of
from .surgery.plan import ComponentPlan, plan_from_masks
from .surgery.recalibrate import recalibrate_batchnorm
from .surgery.reconstruct import Reconstruction, SourceTargets, reconstruct_layers
from .terminal import Progress, progress_enabled, showing_progress
from .training import task_outputs

#: the registered disassembly methods' names (see :mod:`modellego.analysis.methods`)
METHODS = METHOD_REGISTRY.names()


def default_locate(method: str = "contribution") -> LocateConfig:
    """The thresholds ``method`` uses unless given (its ``default_locate``): the public
    code's for the contribution methods (``contribution-2022`` normalising by the max); 0.2
    on the alphas for ``frat`` and 0.01 (the activity threshold) for ``pan-rajan``."""
    return get_method(method).default_locate()


#: the presets :class:`DisassemblyConfig` fills its unset fields from
PRESETS = ("default", "paper")
#: the default preset's accuracy budget (points against the restricted source) ...
DEFAULT_BUDGET = 0.5
#: ... the confidence of the one-sided bound on the drop that must meet it ...
DEFAULT_CONFIDENCE = 0.9
#: ... the validation images per class it is judged on (the validation split first, topped
#: up with training images the profile and the reconstruction do not use) ...
DEFAULT_VALIDATION = 500
#: ... the training images of the task the reconstruction fits on ...
DEFAULT_FIT_IMAGES = 1000
#: ... and how many times the search halves the gap between the family's passing step and
#: its failing neighbour
DEFAULT_BISECT = 2
#: the bisection runs only when the budget is worth at least this many validation images:
#: on fewer, a midpoint that changes no validation prediction passes with bound 0, and each
#: extra candidate judged on the same few images is one more chance of a false pass (the
#: digits MobileNet-V2 {0,1,2}, 162 images: a midpoint passed and lost 1.85 pp on the test
#: split)
BISECT_MIN_IMAGES_IN_BUDGET = 4
#: a halving is judged only while the passing step costs at least this share of the source
#: more than its failing neighbour: the most a halving can win (near the source's cost the
#: family's steps lie a fraction of a point of FLOPs apart)
HALVING_MIN_GAIN = 0.01


@dataclass(frozen=True)
class DisassemblyConfig:
    """What to take out of a model and how.

    Fields left ``None`` come from ``preset``. ``"default"`` (the best we have, for method
    ``contribution``): the mass rule, its threshold searched for the smallest component
    whose validation accuracy is, with ``confidence`` (0.9), within ``max_accuracy_drop``
    (0.5 points) of the restricted source, judged on ``validation_per_class`` (500) images
    per class, every candidate repaired by closed-form reconstruction (``reconstruct``: on
    1000 training images of the task), the family's steps refined by ``bisect`` (2)
    halvings. Thresholds given in ``locate`` turn the search off;
    another target changes it; the rest stays. ``"paper"``: the published method exactly
    (the method's own thresholds, no search, no repair). Methods other than
    ``contribution`` always take their own published defaults."""

    classes: tuple[int, ...]
    samples_per_class: int = 50
    #: ``None``: the preset's (the mass rule for ``default``, else
    #: :func:`default_locate` of ``method``)
    locate: LocateConfig | None = None
    batch_size: int = 64
    #: fold the mean contribution of removed inputs into biases / BN means
    compensate: bool = False
    #: search thresholds (along ``locate.rule``'s family) on the validation split so the
    #: component loses at most this many points against the restricted source ...
    max_accuracy_drop: float | None = None
    #: (``None``: the preset's; see the class docstring) ...
    #: ... or so that it keeps at most this share of the source's FLOPs
    target_flops: float | None = None
    #: ... or at most this share of its parameters
    target_params: float | None = None
    #: after the accuracy search, tighten the most expensive layers one by one (slower)
    refine: bool = False
    #: re-estimate the component's BatchNorm statistics on this many training images of all
    #: the source's classes (0: keep the source's statistics)
    recalibrate_bn: int = 0
    #: re-fit every layer that reads removed channels by ridge least squares on this many
    #: (seeded) training images of the task, to match the source's outputs (0: the plain
    #: cut; ``None``: the preset's); see :mod:`modellego.surgery.reconstruct`. Runs before
    #: ``recalibrate_bn``
    reconstruct: int | None = None
    #: one of :data:`METHODS`; ``contribution-2022`` locates with ``normalize="max"``, and
    #: ``frat`` and ``pan-rajan`` read ``locate.alpha_conv``/``alpha_linear`` as their
    #: thresholds (betas unused)
    method: str = "contribution"
    #: one of :data:`PRESETS`: where the fields left ``None`` come from
    preset: str = "default"
    #: with ``max_accuracy_drop``: a candidate passes when the one-sided upper bound, at this
    #: confidence, of its paired drop against the source on the validation images is within
    #: the budget (see :class:`~modellego.analysis.search.PairedDrop`); ``0``: when its
    #: observed validation accuracy is (the paper preset's criterion)
    confidence: float | None = None
    #: with ``confidence``: judge on at least this many images per class, topping up the
    #: validation split with training images the profile and reconstruction do not use
    validation_per_class: int | None = None
    #: with ``max_accuracy_drop``: after the family's steps, halve this many times the gap
    #: between the candidate found and its failing neighbour, measuring each midpoint
    #: (``None``: the preset's, 2 for ``default``, else 0); only when the budget is worth at
    #: least :data:`BISECT_MIN_IMAGES_IN_BUDGET` validation images, and not with a profile
    #: made in chunks of classes (its masks exist for the family's steps only)
    bisect: int | None = None

    def __post_init__(self) -> None:
        best = self.preset == "default" and self.method == "contribution"
        fill: dict[str, object] = {}
        if self.locate is None:  # an unknown method is reported by validate()
            if best:
                fill["locate"] = LocateConfig(rule="mass")
                if (self.max_accuracy_drop, self.target_flops, self.target_params) == \
                        (None, None, None):
                    fill["max_accuracy_drop"] = DEFAULT_BUDGET
            else:
                fill["locate"] = get_method(self.method).default_locate() \
                    if self.method in METHOD_REGISTRY else LocateConfig()
        if self.reconstruct is None:
            fill["reconstruct"] = DEFAULT_FIT_IMAGES if best and not self.compensate else 0
        if self.confidence is None:
            fill["confidence"] = DEFAULT_CONFIDENCE if best else 0.0
        if self.validation_per_class is None:
            fill["validation_per_class"] = DEFAULT_VALIDATION if best else 0
        if self.bisect is None:
            fill["bisect"] = DEFAULT_BISECT if best else 0
        for name, value in fill.items():
            object.__setattr__(self, name, value)

    @classmethod
    def paper(cls, classes: Sequence[int], **fields) -> DisassemblyConfig:
        """The published method with its exact thresholds (``preset="paper"``)."""
        return cls(tuple(classes), preset="paper", **fields)

    @property
    def thresholds(self) -> LocateConfig:
        """``locate``, which ``__post_init__`` has filled in with the method's defaults."""
        return cast(LocateConfig, self.locate)

    @property
    def fit_images(self) -> int:
        """``reconstruct``, which ``__post_init__`` has filled in."""
        return int(cast(int, self.reconstruct))

    @property
    def searches(self) -> bool:
        """Whether thresholds are searched: an accuracy budget or a cost target is given."""
        return self.max_accuracy_drop is not None or self.target_flops is not None \
            or self.target_params is not None

    @property
    def confident(self) -> bool:
        """Whether an accuracy budget is judged by a confidence bound (see ``confidence``)."""
        return self.max_accuracy_drop is not None and bool(self.confidence)

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ModelLegoError(f"`preset` {self.preset!r} is unknown; use one of "
                                 f"{', '.join(PRESETS)}")
        get_method(self.method).check(self.compensate, self.refine)
        self.thresholds.validate()
        if self.thresholds.task_level and not get_method(self.method).task_level:
            raise ModelLegoError(f"`method` {self.method} locates each class on its own; "
                                 "drop `task_level` from `locate` or use method "
                                 "contribution")
        if self.samples_per_class < 1:
            raise ModelLegoError(f"`samples_per_class` must be >= 1, got "
                                 f"{self.samples_per_class}")
        given = [flag for flag, v in (("`max_accuracy_drop`", self.max_accuracy_drop),
                                      ("`target_flops`", self.target_flops),
                                      ("`target_params`", self.target_params)) if v is not None]
        if len(given) > 1:
            raise ModelLegoError(f"give one of {' and '.join(given)}, not "
                                 f"{'both' if len(given) == 2 else 'all three'}")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise ModelLegoError(f"`max_accuracy_drop` is in points and must lie in "
                                 f"[0, 100], got {self.max_accuracy_drop}")
        if self.recalibrate_bn < 0:
            raise ModelLegoError(f"`recalibrate_bn` is a number of images and must be >= 0, "
                                 f"got {self.recalibrate_bn}")
        if self.fit_images < 0:
            raise ModelLegoError(f"`reconstruct` is a number of images and must be >= 0, "
                                 f"got {self.reconstruct}")
        if not (self.confidence == 0 or 0.5 <= cast(float, self.confidence) < 1):
            raise ModelLegoError(f"`confidence` must be 0 (judge the observed accuracy) or "
                                 f"lie in [0.5, 1), got {self.confidence}")
        if not 0 <= cast(int, self.bisect) <= 10:
            raise ModelLegoError(f"`bisect` is a number of halvings and must lie in [0, 10], "
                                 f"got {self.bisect}")
        if cast(int, self.validation_per_class) < 0:
            raise ModelLegoError(f"`validation_per_class` must be >= 0, got "
                                 f"{self.validation_per_class}")
        if self.reconstruct and self.compensate:
            raise ModelLegoError("give one of `compensate` and `reconstruct`: reconstruction "
                                 "re-fits the biases that compensation would shift")
        if self.refine and self.max_accuracy_drop is None:
            raise ModelLegoError("`refine` needs `max_accuracy_drop`")
        if self.target_flops is not None and not 0 < self.target_flops <= 1:
            raise ModelLegoError(f"`target_flops` is a share of the source's FLOPs and must "
                                 f"lie in (0, 1], got {self.target_flops}")
        if self.target_params is not None and not 0 < self.target_params <= 1:
            raise ModelLegoError(f"`target_params` is a share of the source's parameters and "
                                 f"must lie in (0, 1], got {self.target_params}")

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "samples_per_class": self.samples_per_class,
                "locate": self.thresholds.to_dict(), "batch_size": self.batch_size,
                "compensate": self.compensate, "max_accuracy_drop": self.max_accuracy_drop,
                "target_flops": self.target_flops, "target_params": self.target_params,
                "refine": self.refine, "recalibrate_bn": self.recalibrate_bn,
                "reconstruct": self.reconstruct, "method": self.method,
                "preset": self.preset, "confidence": self.confidence,
                "validation_per_class": self.validation_per_class, "bisect": self.bisect}


@dataclass(frozen=True)
class Component:
    """The result of disassembling a model for a task: the plan and the smaller model."""

    model: nn.Module
    plan: ComponentPlan
    classes: tuple[int, ...]
    selection: SampleSelection
    #: what the method profiles (a :class:`GradientProfile` for ``frat``, an
    #: :class:`ActivityProfile` for ``pan-rajan``)
    profile: Profile
    graph: ChannelGraph = field(repr=False)
    locate: LocateConfig = field(default_factory=LocateConfig)
    search: tuple = ()
    method: str = "contribution"
    #: what ``reconstruct`` re-fitted (``None`` without it)
    reconstruction: Reconstruction | None = None
    #: when the profile was made in chunks of classes (too many classes for
    #: ``max_memory``): each searched config's per-class masks; ``profile`` then holds no
    #: per-class statistics
    chunk_masks: dict[LocateConfig, dict[int, dict[int, torch.Tensor]]] | None = \
        field(default=None, repr=False)
    #: how many chunks of classes the profile was made in (1: all at once)
    profile_chunks: int = 1
    #: what the accuracy search judged on (images, where they came from, the resolution of
    #: one image, the confidence and budget, the chosen candidate's drop and bound);
    #: ``None`` without an accuracy budget
    validation: dict | None = None

    def kept_channels(self) -> dict[str, list[int]]:
        """Per conv/linear layer: ``[kept outputs, total outputs]``."""
        return kept_channels(self.graph, self.plan)

    @property
    def head(self) -> str | None:
        """The component's head (``"one-vs-rest"`` for ``pan-rajan``), or ``None``."""
        return get_method(self.method).head


def kept_channels(graph: ChannelGraph, plan: ComponentPlan) -> dict[str, list[int]]:
    """Per conv/linear layer of ``graph``: ``[outputs kept by plan, total outputs]``."""
    return {lay.name: [len(plan.kept(lay.name)),
                       lay.module.out_channels if isinstance(lay.module, nn.Conv2d)
                       else lay.module.out_features]
            for lay in graph.layers}


def disassemble_model(model: nn.Module, images: Inputs, labels: torch.Tensor, *,
                      classes: Sequence[int], output_classes: Sequence[int],
                      config: DisassemblyConfig | None = None,
                      val_images: Inputs | None = None,
                      val_labels: torch.Tensor | None = None,
                      calibration_images: torch.Tensor | None = None,
                      dist: DistContext | None = None,
                      selection: SampleSelection | None = None,
                      reuse: Component | None = None,
                      graph: ChannelGraph | None = None) -> Component:
    """Extract the component of ``model`` that serves ``classes``.

    Args:
        model: the source network.
        images: normalised training inputs.
        labels: their class ids.
        classes: the task's class ids, in the component's output order.
        output_classes: the class id of each of ``model``'s logits.
        config: the method and its thresholds (default: the default method).
        val_images: normalised validation inputs of the task's classes (a threshold search).
        val_labels: their class ids.
        calibration_images: normalised training inputs of all classes (``recalibrate_bn``).
        dist: the data-parallel context under ``torchrun``.
        selection: samples chosen earlier, to skip the selection pass.
        reuse: a component made earlier from the same model, images and classes.
        graph: the channel graph of this very ``model``, built earlier.

    Returns:
        The :class:`~modellego.disassembly.Component`: its network, plan, ratios, search
        trials and repairs.

    ``images`` are normalised training inputs with class-id ``labels``; ``output_classes[i]``
    is the class id of logit ``i``. Works on any torch.fx-traceable CNN. A threshold search
    (``config.max_accuracy_drop``) needs ``val_images``/``val_labels`` of the task's classes;
    ``config.recalibrate_bn`` needs ``calibration_images`` (normalised training inputs of
    all the source's classes; see :mod:`modellego.surgery.recalibrate`);
    ``config.reconstruct`` fits on a seeded draw of that many of ``images`` of the task's
    classes. ``reuse``: a
    component made earlier from the same model and images for the same classes and sample
    count; its sample selection and profile are taken instead of being computed again.
    ``graph``: :func:`build_channel_graph` of this very ``model`` object and input shape,
    built earlier (tracing patches torch globally, so threads should trace beforehand).
    Under ``dist`` (see :mod:`modellego.runtime.distributed`) sample selection and the
    profile are shared among the ranks; every rank returns the same component.
    ``selection``: samples chosen earlier by :func:`select_samples` on these ``images``
    (``correct_only=True`` for ``contribution-2022``), to skip the selection pass.

    >>> comp = disassemble_model(net, x, y, classes=[0, 2], output_classes=range(10))
    >>> comp.model(x[:1]).shape   # logits of classes 0 and 2
    torch.Size([1, 2])
    """
    config = config or DisassemblyConfig(tuple(classes))
    config.validate()
    if config.recalibrate_bn and calibration_images is None:
        raise ModelLegoError("`recalibrate_bn` needs `calibration_images`")
    classes, output_classes = task_outputs(classes, output_classes)
    if head_of(model) is not None:
        raise ModelLegoError(f"the model carries a {head_of(model)} head (a pan-rajan module); "
                             "disassemble its source model instead")
    method = get_method(config.method)
    base = method.prepare(config.thresholds)
    prof = _task_profile(model, images, labels, classes, output_classes, config, method, base,
                         dist=dist, selection=selection, reuse=reuse, graph=graph)
    # validation images drawn from the training split (a confident search on too few
    # validation images of a class), kept out of the reconstruction's fit
    topup = torch.zeros(0, dtype=torch.long)
    if config.confident:
        topup = validation_topup(labels, classes, prof.selection, val_labels,
                                 cast(int, config.validation_per_class))
    candidates = TaskCandidates(
        model, prof, classes, output_classes, config, method, base,
        fit_images=_fit_images(images, labels, classes, topup, config),
        calibration_images=calibration_images)
    chosen, trials, judge = base, cast(list[Trial], []), None
    validation: dict = {}
    if config.searches:
        chosen, trials, judge, validation = _search_candidates(
            candidates, images, labels, topup, val_images, val_labels)
    plan, component, fit = candidates.build_fitted(chosen)
    if judge is not None:  # the chosen candidate's figures, from its trial
        last = [t for t in trials if t.config == chosen and t.accuracy is not None]
        acc, ok, note = (last[-1].accuracy, last[-1].ok, last[-1].note) if last \
            else judge(chosen)
        validation.update({"chosen_accuracy": acc, "chosen_passes": ok, "chosen": note})
    return Component(component, plan, classes, prof.selection, prof.profile, prof.graph,
                     chosen, tuple(t.to_dict() for t in trials), method.name, fit,
                     prof.chunk_masks, prof.chunks(len(classes)),
                     validation if judge is not None else None)


@dataclass(frozen=True)
class TaskProfile:
    """What every candidate of a disassembly shares: the channel graph, the selected
    samples, the method's profile and (for a profile made in chunks of classes) each
    searched config's per-class masks."""

    graph: ChannelGraph
    selection: SampleSelection
    profile: Profile
    chunk_masks: dict[LocateConfig, dict[int, dict[int, torch.Tensor]]] | None = None
    per_chunk: int = 0

    def chunks(self, classes: int) -> int:
        """How many chunks of classes the profile was made in (1: all at once)."""
        return 1 if self.chunk_masks is None else -(-classes // self.per_chunk)


def _check_graph(model: nn.Module, graph: ChannelGraph, what: str) -> None:
    modules = dict(model.named_modules())
    if any(lay.module is not modules.get(lay.name) for lay in graph.layers):
        raise ModelLegoError(f"the given {what} was built from another model object")


def _task_profile(model: nn.Module, images: Inputs, labels: torch.Tensor,
                  classes: tuple[int, ...], output_classes: Sequence[int],
                  config: DisassemblyConfig, method: Method, base: LocateConfig, *,
                  dist: DistContext | None, selection: SampleSelection | None,
                  reuse: Component | None, graph: ChannelGraph | None) -> TaskProfile:
    """The graph, samples and profile of the task (those of ``reuse`` when it matches)."""
    if reuse is not None and reuse.chunk_masks is None and (
            reuse.classes, reuse.selection.k, reuse.method) == (
            classes, config.samples_per_class, method.name):
        _check_graph(model, reuse.graph, "component to reuse")
        return TaskProfile(reuse.graph, reuse.selection, reuse.profile)
    if graph is None:
        graph = build_channel_graph(model, tuple(images.shape[1:]))
    else:
        _check_graph(model, graph, "channel graph")
    selection = _task_samples(model, images, labels, classes, output_classes, config,
                              method.correct_only, dist, selection,
                              pass_batch(graph, images))
    layers = {lay.name: lay.module for lay in profiled_layers(graph)}
    per_chunk = classes_per_chunk(layers)
    if len(classes) <= per_chunk:
        if method.chunkable:
            check_one_class_fits(layers)
        idx = torch.tensor([i for c in classes for i in selection.indices[c]],
                           dtype=torch.long)
        profile = method.profile(model, layers, take(images, idx), labels[idx], classes,
                                 batch_size=config.batch_size, dist=dist)
        return TaskProfile(graph, selection, profile)
    if not method.chunkable:
        raise ModelLegoError(
            f"the profile of {len(classes)} classes would hold about "
            f"{len(classes) * statistics_bytes(layers) / 2**30:.1f} GiB of statistics "
            f"at once, and `method` {method.name} cannot profile in chunks of classes; "
            "raise `max_memory`, or use method contribution")
    if config.refine:
        raise ModelLegoError(
            f"`refine` re-reads the profile of all {len(classes)} classes, which is "
            f"made in chunks of {per_chunk} within `max_memory`; drop `refine` or "
            "raise `max_memory`")
    check_one_class_fits(layers)
    configs = [base] + (search_family(method, base, config) if config.searches else [])
    if config.max_accuracy_drop is not None and _task_level_first(method, classes, base):
        # the task-level family the search walks first (see _variants)
        configs += [replace(c, task_level=True) for c in configs]
    profile, chunk_masks = chunked_class_masks(
        method, model, graph, layers, images, labels, selection, classes,
        output_classes, list(dict.fromkeys(configs)), per_chunk,
        batch_size=config.batch_size, dist=dist)
    return TaskProfile(graph, selection, profile, chunk_masks, per_chunk)


def _task_samples(model: nn.Module, images: Inputs, labels: torch.Tensor,
                  classes: tuple[int, ...], output_classes: Sequence[int],
                  config: DisassemblyConfig, correct_only: bool, dist: DistContext | None,
                  selection: SampleSelection | None, batch_size: int) -> SampleSelection:
    """The samples the profile reads: ``selection`` when given (checked against the task),
    else selected here (in batches of ``batch_size``)."""
    if selection is None:
        if isinstance(images, ModelInputs) and not correct_only:
            # streamed images: a pool no larger than k per class is taken whole, without
            # a forward pass to rank what would all be selected anyway
            every = take_every_sample(labels, classes, config.samples_per_class)
            if every is not None:
                return every
        return select_samples(model, images, labels, classes, output_classes,
                              k=config.samples_per_class, batch_size=batch_size, dist=dist,
                              correct_only=correct_only)
    if selection.correct_only != correct_only or \
            selection.k != config.samples_per_class or \
            any(c not in selection.indices for c in classes):
        raise ModelLegoError(
            f"the given sample selection (k={selection.k}, classes "
            f"{list(selection.classes)}, correct_only={selection.correct_only}) does not "
            f"match the task (k={config.samples_per_class}, classes {list(classes)}, "
            f"correct_only={correct_only})")
    return selection


def _fit_images(images: Inputs, labels: torch.Tensor, classes: tuple[int, ...],
                topup: torch.Tensor, config: DisassemblyConfig) -> torch.Tensor:
    """The reconstruction's images: a seeded draw from the task's training images (as the
    calibration images are drawn), without those drawn for validation (``topup``)."""
    if not config.fit_images:
        return torch.zeros((0, *images.shape[1:]))
    in_task = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    in_task[topup] = False
    pool = in_task.nonzero().flatten()
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
                [:config.fit_images]]
    return as_tensor(take(images, pick), "the reconstruction's images")


class TaskCandidates(Candidates[LocateConfig]):
    """The candidates of a disassembly, one per locating config: cut by the channels the
    config locates, then reconstructed, compensated and their BatchNorm re-estimated, as
    the disassembly's config asks (see :class:`~modellego.analysis.candidates.Candidates`)."""

    def __init__(self, model: nn.Module, prof: TaskProfile, classes: tuple[int, ...],
                 output_classes: Sequence[int], config: DisassemblyConfig, method: Method,
                 base: LocateConfig, *, fit_images: torch.Tensor,
                 calibration_images: torch.Tensor | None) -> None:
        # with a cost target and no accuracy budget, candidates are priced as cut
        super().__init__(model, fit_images.shape[1:],
                         price_repaired=config.max_accuracy_drop is not None)
        self.prof, self.config, self.method, self.base = prof, config, method, base
        self.classes, self.output_classes = classes, output_classes
        self.out_idx = method.output_indices(classes, output_classes)
        self.hint = method.hint.removesuffix(USE_MASS_RULE) if base.rule == "mass" \
            else method.hint
        self.fit_images, self.calibration_images = fit_images, calibration_images
        self.bn_after = {lay.name: lay.bn_after for lay in prof.graph.layers}
        #: the batch of the passes over many images (reconstruction, judgement)
        self.batch = pass_batch(prof.graph, fit_images)
        # the source's outputs on the reconstruction's images, measured once for all
        self.targets = SourceTargets()

    def plan(self, key: LocateConfig) -> ComponentPlan:
        prof = self.prof
        if prof.chunk_masks is not None:  # profiled in chunks: the classes' masks were kept
            masks = union_of_class_masks(prof.graph, self.classes,
                                         prof.chunk_masks[key].__getitem__)
        else:
            masks = self.method.locate(prof.graph, prof.profile, self.classes,
                                       self.output_classes, key)
        return plan_from_masks(prof.graph, masks, self.out_idx, hint=self.hint)

    def make(self, plan: ComponentPlan, repair: bool
             ) -> tuple[nn.Module, Reconstruction | None]:
        config = self.config
        net = apply_plan(self.model, plan).eval()
        fit = reconstruct_layers(net, self.model, self.prof.graph, plan, self.fit_images,
                                 batch_size=self.batch,
                                 cache=self.targets) if config.fit_images and repair else None
        comp = self.method.finish(net, self.classes).eval()
        if config.compensate and repair:  # the methods that allow it profile contributions
            compensate_removed_inputs(comp, plan,
                                      cast(ContributionProfile, self.prof.profile).means,
                                      self.bn_after)
        if self.calibration_images is not None and config.recalibrate_bn and repair:
            recalibrate_batchnorm(comp, self.calibration_images)
        return comp, fit


def _search_candidates(cands: TaskCandidates, images: Inputs, labels: torch.Tensor,
                       topup: torch.Tensor, val_images: Inputs | None,
                       val_labels: torch.Tensor | None
                       ) -> tuple[LocateConfig, list[Trial], Callable | None, dict]:
    """The threshold search of ``cands.config``: the config chosen, the trials, the
    confident judge (``None`` without one) and what it judged on."""
    config, classes, base = cands.config, cands.classes, cands.base
    cost_of, cost, target = cands.flops_of, "flops", config.target_flops
    if config.target_params is not None:  # the same search, priced in parameters
        cost_of, cost, target = cands.params_of, "params", config.target_params
    accuracy_of, min_acc, judge, validation = None, None, None, {}
    if config.confident:
        sets = ([(val_images, val_labels)] if val_images is not None and
                val_labels is not None and len(val_labels) else []) + \
            ([(take(images, topup), labels[topup])] if len(topup) else [])
        if not sets:
            raise ModelLegoError("`max_accuracy_drop` needs validation images of the "
                                 "task: give `val_images`, or training images of its "
                                 "classes beyond the profile's samples")
        judge, validation = confident_judge(
            cands.model, sets, classes, cands.output_classes, cands.build,
            cast(float, config.confidence), cast(float, config.max_accuracy_drop),
            batch=cands.batch)
        validation.update({"from_validation_split": 0 if val_labels is None
                           else int(len(val_labels)), "from_training_split": len(topup)})
    elif config.max_accuracy_drop is not None:
        accuracy_of, min_acc = _accuracy_judge(cands, val_images, val_labels)
    halvings = bisect_steps(config, cands.prof.chunk_masks is None,
                            validation.get("images") if judge is not None
                            else None if val_labels is None else len(val_labels))
    if judge is not None:
        validation["bisect"] = halvings
    family = search_family(cands.method, base, config)
    accuracy_target = judge is not None or accuracy_of is not None
    if accuracy_target and _task_level(cands):  # the task as one class first: see _variants
        family = [replace(c, task_level=True) for c in family]
    if judge is not None:
        judge = _pinning(cands, judge, cost_of)
    chosen, trials = search(family, cost_of, accuracy_of, min_accuracy=min_acc,
                            max_flops_ratio=target, cost=cost, judge=judge, bisect=halvings,
                            min_gain=HALVING_MIN_GAIN)
    if accuracy_target:
        for variant in _variants(cands, family):
            # the same search along another family, over the candidates that could replace
            # the result (their plain cut costs less), the least aggressive first: one
            # probe when it fails; the cheaper of the components that pass is kept
            passed = {t.config for t in trials if t.ok}
            limit = cost_of(chosen) if chosen in passed else math.inf
            cheaper = cheaper_candidates(variant, lambda c: _cut_cost(cands, c), limit)
            if not cheaper:
                continue
            other, more = search(cheaper, cost_of, accuracy_of,
                                 min_accuracy=min_acc, cost=cost, judge=judge,
                                 bisect=halvings, top_first=chosen in passed,
                                 min_gain=HALVING_MIN_GAIN)
            trials = trials + more
            passed = {t.config for t in trials if t.ok}
            if other in passed and (chosen not in passed or cost_of(other) < cost_of(chosen)):
                chosen = other
    if config.refine and (judge is not None or accuracy_of is not None):
        # (refine needs the accuracy budget: validate() checked it is given)
        # the layers whose inputs cost most in the component found so far
        macs = macs_by_layer(cands.build(chosen), cands.input_shape)
        kinds = {lay.name: lay.kind for lay in profiled_layers(cands.prof.graph)}
        order = sorted((n for n in macs if n in kinds), key=lambda n: -macs[n])[:8]
        default = {"conv": chosen.beta_conv, "linear": chosen.beta_linear}
        chosen, more = refine(chosen, [(n, default[kinds[n]]) for n in order],
                              cands.flops_of, accuracy_of, min_acc, judge=judge)
        trials = trials + more
    return chosen, trials, judge, validation


def _task_level_first(method: Method, classes: Sequence[int], base: LocateConfig) -> bool:
    """Whether an accuracy search locates the task as one class first and the union of its
    classes' masks second: a task of several classes, a method that can, and thresholds
    that do not ask for the task level themselves (then it is the only family). The
    chunked profile keeps masks for exactly these families."""
    return len(classes) > 1 and method.task_level and not base.task_level


def _task_level(cands: TaskCandidates) -> bool:
    """:func:`_task_level_first` of ``cands``' search."""
    return _task_level_first(cands.method, cands.classes, cands.base)


def _variants(cands: TaskCandidates, family: list[LocateConfig]) -> list[list[LocateConfig]]:
    """The other families an accuracy search of ``cands`` walks after ``family``, each
    cut by the caller to the candidates cheaper than the result so far:

    - on a task of several classes (a method that locates with
      :func:`~modellego.analysis.locate.locate`) the first family locates the task at the
      task level (the task as one class, ``task_level``); then the OR of its classes'
      masks. On a narrow residual network the union of seven classes' channels keeps most
      of it (Fashion-MNIST ResNet-18 {3..9} cut at beta 0.2: 89 % of the FLOPs as the
      union, 62 % located as one task), and the task level gave the smaller component on
      10 of the 12 tasks of the disassembly benchmark when the union was searched first
      (2026-12-07), so the union usually costs one probe;
    - on an attention network, each of these families with every contributing head kept:
      heads serve most classes alike (Vulcan, 2026; our transformer benchmark).
    """
    graph = cands.prof.graph
    out = [family]
    if _task_level(cands):
        out.append([replace(c, task_level=False) for c in family])
    heads = [lay.name for lay in graph.layers if layer_heads(graph, lay)]
    if heads:
        whole = tuple((name, 0.0) for name in heads)
        out += [[replace(c, layer_beta=c.layer_beta + whole) for c in f] for f in out]
    out = out[1:]
    chunks = cands.prof.chunk_masks
    return [f for f in ([c for c in f if chunks is None or c in chunks] for f in out) if f]


def _pinning(cands: TaskCandidates, judge: Callable, cost_of: Callable) -> Callable:
    """``judge`` that pins (:meth:`Candidates.pin`) each candidate that passes and costs
    no more than those that passed before it (a later one of equal cost is the more
    aggressive), so the search's result is not cut and repaired again."""
    best: list[LocateConfig] = []

    def judged(cfg: LocateConfig) -> tuple[float, bool, str]:
        acc, ok, note = judge(cfg)
        if ok and (not best or cost_of(cfg) <= cost_of(best[0])):
            best[:] = [cfg]
            cands.pin(cfg)
        return acc, ok, note

    return judged


def _cut_cost(cands: TaskCandidates, key: LocateConfig) -> float:
    """The FLOPs share of candidate ``key`` cut and not repaired, without building it
    into the candidates' cache (a repair changes weights, not the cost); ``inf`` when it
    empties a layer."""
    try:
        plan = cands.plan(key)
    except PlanError:
        return math.inf
    return count_flops(apply_plan(cands.model, plan), cands.input_shape) / cands.source_flops


def _accuracy_judge(cands: TaskCandidates, val_images: Inputs | None,
                    val_labels: torch.Tensor | None
                    ) -> tuple[Callable[[LocateConfig], float], float]:
    """The observed-accuracy criterion (``confidence`` 0): a candidate's validation
    accuracy, and the least it may have (the restricted source's less the budget)."""
    if val_images is None or val_labels is None:
        raise ModelLegoError("`max_accuracy_drop` needs `val_images` and `val_labels`")
    src_logits = predict_logits(cands.model, val_images, batch_size=cands.batch)
    restricted = accuracy_from_logits(src_logits, val_labels, cands.output_classes,
                                      restrict_to=cands.classes).accuracy

    def accuracy_of(cfg: LocateConfig) -> float:
        return accuracy_from_logits(predict_logits(cands.build(cfg), val_images,
                                                   batch_size=cands.batch), val_labels,
                                    cands.classes).accuracy

    return accuracy_of, restricted - cast(float, cands.config.max_accuracy_drop) / 100


def bisect_steps(config: DisassemblyConfig, whole_profile: bool, images: int | None) -> int:
    """The halvings the search of ``config`` makes after the family's steps: ``bisect``
    when an accuracy budget is judged on ``images`` validation images that the budget is
    worth at least :data:`BISECT_MIN_IMAGES_IN_BUDGET` of, and the profile is whole (not
    made in chunks of classes); else 0."""
    if config.max_accuracy_drop is None or not whole_profile or not images:
        return 0
    if images * config.max_accuracy_drop / 100 < BISECT_MIN_IMAGES_IN_BUDGET:
        return 0
    return int(cast(int, config.bisect))


def search_family(method, base: LocateConfig, config: DisassemblyConfig
                  ) -> list[LocateConfig]:
    """The thresholds a search of ``config`` walks from ``base``: the method's family, with
    the finer steps of :func:`~modellego.analysis.search.cost_family` for a cost target
    (no accuracy budget: candidates are priced as cut, so the extra steps are cheap)."""
    family = method.candidates(base)
    return family if config.max_accuracy_drop is not None else cost_family(family)


def validation_topup(labels: torch.Tensor, classes: Sequence[int], selection: SampleSelection,
                     val_labels: torch.Tensor | None, per_class: int) -> torch.Tensor:
    """Indices into the training ``labels`` that top the validation split up to
    ``per_class`` images of each of ``classes``: a seeded draw from the class's training
    images the profile did not select (none where the split already has enough), at most
    half of them, so that the reconstruction keeps the other half to fit on."""
    picked: list[torch.Tensor] = []
    chosen = {i for c in classes for i in selection.indices.get(c, ())}
    gen = torch.Generator().manual_seed(1)
    for c in classes:
        have = 0 if val_labels is None else int((val_labels == c).sum())
        need = per_class - have
        if need <= 0:
            continue
        pool = [i for i in (labels == c).nonzero().flatten().tolist() if i not in chosen]
        if len(pool) >= 2:
            order = torch.randperm(len(pool), generator=gen)[:min(need, len(pool) // 2)]
            picked.append(torch.tensor(pool, dtype=torch.long)[order])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


def confident_judge(model: nn.Module, sets: Sequence[tuple[Inputs, torch.Tensor]],
                    classes: Sequence[int], output_classes: Sequence[int],
                    component_of, confidence: float, budget: float,
                    batch: int | None = None):
    """The pass/fail of a candidate under a confident budget: the one-sided ``confidence``
    upper bound of its paired drop against the restricted source on ``sets`` (image, label
    pairs) must be at most ``budget`` points. Returns ``judge(config) -> (accuracy,
    passes, note)`` and a dict describing the validation (filled in further by the
    caller).

    A candidate is judged block by block, each block one batch of ``batch`` images
    (default: :func:`~modellego.data.lazy.default_batch`) of
    :func:`~modellego.metrics.predict_logits` (so every image is predicted in the batch a
    whole pass would put it in, and the verdicts do not depend on where a judgement stops),
    and stops as soon as it surely fails: when even the best outcome on the images not yet
    seen (every one the source gets wrong gained, none lost) leaves the bound over all of
    them above the budget (:func:`surely_fails`). The verdict is the one the whole set
    gives; a candidate stopped early reports its accuracy on the images it was judged on."""
    labels = torch.cat([y for _, y in sets])
    source = torch.cat([correct_flags(predict_logits(model, x, batch_size=batch), y,
                                      output_classes,
                                      restrict_to=classes) for x, y in sets])
    n = len(labels)
    validation: dict = {"images": n, "resolution_pp": 100 / n, "confidence": confidence,
                        "budget_pp": budget,
                        "source_accuracy": float(source.double().mean())}
    blocks = []  # (set, start, stop)
    for i, (x, y) in enumerate(sets):
        size = batch or default_batch(tuple(x.shape[1:]))
        blocks += [(i, a, min(a + size, len(y))) for a in range(0, len(y), size)]

    def judge(cfg: LocateConfig) -> tuple[float, bool, str]:
        comp = component_of(cfg)
        flags = torch.zeros(0, dtype=torch.bool)
        for k, (i, a, b) in enumerate(blocks):
            x, y = sets[i]
            logits = predict_logits(comp, take(x, torch.arange(a, b)), batch_size=b - a)
            flags = torch.cat([flags, correct_flags(logits, y[a:b], classes)])
            if k + 1 < len(blocks):
                seen = len(flags)
                partial = PairedDrop.of(source[:seen], flags)
                wrong = int((~source[seen:]).sum())
                if surely_fails(partial, n - seen - wrong, wrong, n, confidence, budget):
                    return (float(flags.double().mean()), False,
                            f"stopped after {seen} of {n} images: {partial.lost} lost, "
                            f"{partial.gained} gained, the bound exceeds {budget:.2f} pp at "
                            f"{confidence:.0%} whatever the other {n - seen} give")
        paired = PairedDrop.of(source, flags)
        bound = 100 * paired.upper(confidence)
        return (float(flags.double().mean()), bound <= budget + 1e-9,
                f"drop {100 * paired.drop:+.2f} pp ({paired.lost} lost, {paired.gained} "
                f"gained of {n}), bound {bound:.2f} pp at {confidence:.0%}")

    return judge, validation


def surely_fails(seen: PairedDrop, right: int, wrong: int, n: int, confidence: float,
                 budget: float) -> bool:
    """Whether every completion of ``seen`` (a paired drop on some of ``n`` images) has its
    bound above ``budget`` points: the other images are ``right`` the source gets right
    (each may be lost or not) and ``wrong`` it gets wrong (each may be gained or not); the
    bound is taken at every reachable ``(lost, gained)``."""
    lost = torch.arange(seen.lost, seen.lost + right + 1, dtype=torch.float64)[:, None]
    gained = torch.arange(seen.gained, seen.gained + wrong + 1, dtype=torch.float64)[None, :]
    if lost.numel() * gained.numel() > 4_000_000:  # too many completions to check: go on
        return False
    drop = (lost - gained) / n
    var = ((lost + gained) / n - drop ** 2).clamp(min=0) / n
    z = NormalDist().inv_cdf(confidence)
    return bool((100 * (drop + z * var.sqrt())).min() > budget + 1e-9)


def statistics_bytes(layers: Mapping[str, nn.Module]) -> int:
    """Bytes of one class's profile statistics: a float64 ``Q x P`` per profiled layer."""
    total = 0
    for module in layers.values():
        w = cast(torch.Tensor, module.weight)
        total += int(w.shape[0]) * int(w.shape[1]) * 8
    return total


#: how many copies of a class's statistics a profile holds at once, for the memory bound
#: (the running sums, a chunk's sums and the copies locating makes)
STATISTICS_COPIES = 3


def classes_per_chunk(layers: Mapping[str, nn.Module]) -> int:
    """How many classes one profile may hold within :func:`~modellego.data.lazy.max_memory`
    (a third of it for the statistics: the running sums, a chunk's sums and the copies
    locating makes)."""
    return max(1, max_memory() // (STATISTICS_COPIES * max(1, statistics_bytes(layers))))


def pass_batch(graph: ChannelGraph, images: Inputs) -> int:
    """The batch of a pass of the network of ``graph`` over many ``images`` (sample
    selection, reconstruction, judgement): :func:`~modellego.data.lazy.default_batch` with
    the network's largest activation per image, so that a batch stays in a core's caches.
    It changes how long a pass takes, not what it computes (up to float rounding)."""
    return default_batch(tuple(images.shape[1:]), sample_bytes=graph.sample_bytes())


def check_one_class_fits(layers: Mapping[str, nn.Module]) -> None:
    """Refuse, before any pass, a profile whose statistics for even one class would not fit
    in :func:`~modellego.data.lazy.max_memory` (as :func:`classes_per_chunk` counts them):
    chunks of classes cannot go below one class, and memory stays bounded."""
    one = statistics_bytes(layers)
    need = STATISTICS_COPIES * one
    if need <= max_memory():
        return
    name, w = max(((n, cast(torch.Tensor, m.weight)) for n, m in layers.items()),
                  key=lambda item: int(item[1].shape[0]) * int(item[1].shape[1]))
    raise ModelLegoError(
        f"the contribution profile of one class holds {one / 2**30:.1f} GiB of statistics "
        f"(a float64 outputs x inputs table for each of {len(layers)} layers, the largest "
        f"{name!r} {int(w.shape[0])} x {int(w.shape[1])}), about {need / 2**30:.1f} GiB "
        f"with the copies beside it, more than the memory bound of "
        f"{max_memory() / 2**30:.1f} GiB; raise `max_memory` on a machine with that much "
        "memory")


def chunked_class_masks(method, model: nn.Module, graph: ChannelGraph,
                        layers: Mapping[str, nn.Module], images: Inputs, labels: torch.Tensor,
                        selection: SampleSelection, classes: Sequence[int],
                        output_classes: Sequence[int], configs: Sequence[LocateConfig],
                        per_chunk: int, *, batch_size: int, dist: DistContext | None
                        ) -> tuple[ContributionProfile,
                                   dict[LocateConfig, dict[int, dict[int, torch.Tensor]]]]:
    """Profile ``classes`` ``per_chunk`` at a time and keep, for every one of ``configs``,
    each class's masks (a few bits per channel) instead of its statistics. Returns a profile
    without per-class statistics (its ``layers`` are empty; ``means`` and ``samples`` are
    of all classes) and ``masks[config][class]``.

    For a ``task_level`` config, the task is located as one class from the classes'
    statistics summed (in class order, as :func:`~modellego.analysis.locate.locate_class`
    sums them; one class's statistics more in memory), and every class maps to the
    task's masks."""
    chunks = [tuple(classes[a:a + per_chunk]) for a in range(0, len(classes), per_chunk)]
    masks: dict[LocateConfig, dict[int, dict[int, torch.Tensor]]] = {c: {} for c in configs}
    merged: dict[str, torch.Tensor] = {}
    whole = any(c.task_level for c in configs)
    signed: dict[str, torch.Tensor] = {}
    samples: dict[int, int] = {}
    seconds, total = 0.0, 0
    with Progress(len(chunks), f"profile of {len(classes)} classes in {len(chunks)} chunks",
                  enabled=progress_enabled()) as bar:
        for part in chunks:
            idx = torch.tensor([i for c in part for i in selection.indices[c]],
                               dtype=torch.long)
            with showing_progress(False):  # one line per chunk, not per chunk's batches
                prof = cast(ContributionProfile, method.profile(
                    model, layers, take(images, idx), labels[idx], part,
                    batch_size=batch_size, dist=dist))
            for cfg in configs:
                if not cfg.task_level:
                    for c in part:
                        masks[cfg][c] = method.class_masks(graph, prof, c, output_classes,
                                                           cfg)
            if whole:
                for c in part:
                    for name in prof.layers:
                        stat = prof.for_class(name, c)
                        merged[name] = merged[name] + stat if name in merged else stat.clone()
            for name, m in prof.means.items():  # means of a chunk: its signed sums / n
                add = m * len(idx)
                signed[name] = signed[name] + add if name in signed else add
            samples.update(prof.samples)
            seconds += prof.seconds
            total += len(idx)
            del prof
            bar.update(1)
    means = {name: v / max(1, total) for name, v in signed.items()}
    if whole:  # the task as one class, out of the classes' ids
        task = ContributionProfile((-1,), {n: t[None] for n, t in merged.items()},
                                   {-1: total}, seconds)
        outputs = [list(output_classes).index(c) for c in classes]
        for cfg in configs:
            if cfg.task_level:
                found = locate_class(graph, task, outputs, -1, cfg)
                masks[cfg] = {c: found for c in classes}
    return ContributionProfile(tuple(classes), {}, samples, seconds, means), masks
