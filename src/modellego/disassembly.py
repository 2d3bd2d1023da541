"""Disassembly: sample selection -> contribution profile -> locating -> extraction -> report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence, cast

import torch
from torch import nn

from .analysis.locate import LocateConfig, profiled_layers, union_of_class_masks
from .analysis.methods import METHODS as METHOD_REGISTRY
from .analysis.methods import Profile, get_method
from .analysis.profile import (  # noqa: F401  (tests patch contribution_profile here)
    ContributionProfile,
    SampleSelection,
    contribution_profile,
    select_samples,
    take_every_sample,
)
from .analysis.search import Trial, refine, search
from .data.lazy import Inputs, ModelInputs, as_tensor, max_memory, take
from .errors import ModelLegoError
from .metrics import (
    accuracy_from_logits,
    count_flops,
    count_params,
    macs_by_layer,
    predict_logits,
)
from .runtime.distributed import DistContext
from .surgery.extract import apply_plan, compensate_removed_inputs
from .surgery.graph import ChannelGraph, build_channel_graph
from .surgery.head import head_of
from .surgery.plan import ComponentPlan, plan_from_masks
from .surgery.recalibrate import recalibrate_batchnorm
from .surgery.reconstruct import Reconstruction, reconstruct_layers
from .terminal import Progress, progress_enabled, showing_progress
from .training import task_outputs

#: the registered disassembly methods' names (see :mod:`modellego.analysis.methods`)
METHODS = METHOD_REGISTRY.names()


def default_locate(method: str = "contribution") -> LocateConfig:
    """The thresholds ``method`` uses unless given (its ``default_locate``): the public
    code's for the contribution methods (``contribution-2022`` normalising by the max); 0.2
    on the alphas for ``frat`` and 0.01 (the activity threshold) for ``pan-rajan``."""
    return get_method(method).default_locate()


@dataclass(frozen=True)
class DisassemblyConfig:
    """What to take out of a model and how."""

    classes: tuple[int, ...]
    samples_per_class: int = 50
    #: ``None`` (the default) becomes :func:`default_locate` of ``method``
    locate: LocateConfig | None = None
    batch_size: int = 64
    #: fold the mean contribution of removed inputs into biases / BN means
    compensate: bool = False
    #: search thresholds (along ``locate.rule``'s family) on the validation split so the
    #: component loses at most this many points against the restricted source ...
    max_accuracy_drop: float | None = None
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
    #: cut); see :mod:`modellego.surgery.reconstruct`. Runs before ``recalibrate_bn``
    reconstruct: int = 0
    #: one of :data:`METHODS`; ``contribution-2022`` locates with ``normalize="max"``, and
    #: ``frat`` and ``pan-rajan`` read ``locate.alpha_conv``/``alpha_linear`` as their
    #: thresholds (betas unused)
    method: str = "contribution"

    def __post_init__(self) -> None:
        if self.locate is None:  # an unknown method is reported by validate()
            object.__setattr__(self, "locate", get_method(self.method).default_locate()
                               if self.method in METHOD_REGISTRY else LocateConfig())

    @property
    def thresholds(self) -> LocateConfig:
        """``locate``, which ``__post_init__`` has filled in with the method's defaults."""
        return cast(LocateConfig, self.locate)

    def validate(self) -> None:
        get_method(self.method).check(self.compensate, self.refine)
        self.thresholds.validate()
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
        if self.reconstruct < 0:
            raise ModelLegoError(f"`reconstruct` is a number of images and must be >= 0, "
                                 f"got {self.reconstruct}")
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
                "reconstruct": self.reconstruct, "method": self.method}


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
    >>> comp.model(x[:1]).shape   # (1, 2): logits of classes 0 and 2
    """
    config = config or DisassemblyConfig(tuple(classes))
    config.validate()
    if config.recalibrate_bn and calibration_images is None:
        raise ModelLegoError("`recalibrate_bn` needs `calibration_images`")
    classes, output_classes = task_outputs(classes, output_classes)
    if head_of(model) is not None:
        raise ModelLegoError(f"the model carries a {head_of(model)} head (a pan-rajan module); "
                             "disassemble its source model instead")
    input_shape = tuple(images.shape[1:])
    method = get_method(config.method)
    correct_only = method.correct_only
    base = method.prepare(config.thresholds)
    hint = method.hint

    def check_graph(g: ChannelGraph, what: str) -> None:
        modules = dict(model.named_modules())
        if any(lay.module is not modules.get(lay.name) for lay in g.layers):
            raise ModelLegoError(f"the given {what} was built from another model object")

    chunk_masks: dict[LocateConfig, dict[int, dict[int, torch.Tensor]]] | None = None
    per_chunk = len(classes)
    if reuse is not None and reuse.chunk_masks is None and (
            reuse.classes, reuse.selection.k, reuse.method) == (
            classes, config.samples_per_class, method.name):
        check_graph(reuse.graph, "component to reuse")
        graph, selection, profile = reuse.graph, reuse.selection, reuse.profile
    else:
        if graph is None:
            graph = build_channel_graph(model, input_shape)
        else:
            check_graph(graph, "channel graph")
        if selection is None and isinstance(images, ModelInputs) and not correct_only:
            # streamed images: a pool no larger than k per class is taken whole, without
            # a forward pass to rank what would all be selected anyway
            selection = take_every_sample(labels, classes, config.samples_per_class)
        if selection is None:
            selection = select_samples(model, images, labels, classes, output_classes,
                                       k=config.samples_per_class, dist=dist,
                                       correct_only=correct_only)
        elif selection.correct_only != correct_only or \
                selection.k != config.samples_per_class or \
                any(c not in selection.indices for c in classes):
            raise ModelLegoError(
                f"the given sample selection (k={selection.k}, classes "
                f"{list(selection.classes)}, correct_only={selection.correct_only}) does not "
                f"match the task (k={config.samples_per_class}, classes {list(classes)}, "
                f"correct_only={correct_only})")
        layers = {lay.name: lay.module for lay in profiled_layers(graph)}
        per_chunk = classes_per_chunk(layers)
        if len(classes) > per_chunk:
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
            searching = config.max_accuracy_drop is not None or \
                config.target_flops is not None or config.target_params is not None
            configs = [base] + (method.candidates(base) if searching else [])
            profile, chunk_masks = chunked_class_masks(
                method, model, graph, layers, images, labels, selection, classes,
                output_classes, configs, per_chunk, batch_size=config.batch_size, dist=dist)
        else:
            idx = torch.tensor([i for c in classes for i in selection.indices[c]],
                               dtype=torch.long)
            profile = method.profile(model, layers, take(images, idx), labels[idx], classes,
                                     batch_size=config.batch_size, dist=dist)
    out_idx = method.output_indices(classes, output_classes)
    bn_after = {lay.name: lay.bn_after for lay in graph.layers}
    # the reconstruction's images: a seeded draw from the task's training images (as the
    # calibration images are drawn)
    fit_images = torch.zeros((0, *input_shape))
    if config.reconstruct:
        pool = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype)).nonzero().flatten()
        pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
                    [:config.reconstruct]]
        fit_images = as_tensor(take(images, pick), "the reconstruction's images")
    fits: list[Reconstruction] = []

    def build(cfg: LocateConfig) -> tuple[ComponentPlan, nn.Module]:
        if chunk_masks is not None:  # profiled in chunks: the classes' masks were kept
            masks = union_of_class_masks(graph, classes, chunk_masks[cfg].__getitem__)
        else:
            masks = method.locate(graph, profile, classes, output_classes, cfg)
        plan = plan_from_masks(graph, masks, out_idx, hint=hint)
        net = apply_plan(model, plan).eval()
        if config.reconstruct:
            fits.append(reconstruct_layers(net, model, graph, plan, fit_images))
        comp = method.finish(net, classes).eval()
        if config.compensate:  # the methods that allow it profile contributions
            compensate_removed_inputs(comp, plan, cast(ContributionProfile, profile).means,
                                      bn_after)
        if calibration_images is not None and config.recalibrate_bn:
            recalibrate_batchnorm(comp, calibration_images)
        return plan, comp

    chosen, trials = base, cast(list[Trial], [])
    if config.max_accuracy_drop is not None or config.target_flops is not None \
            or config.target_params is not None:
        source_flops = count_flops(model, input_shape)

        def flops_of(cfg: LocateConfig) -> float:
            return count_flops(build(cfg)[1], input_shape) / source_flops

        cost_of, cost, target = flops_of, "flops", config.target_flops
        if config.target_params is not None:  # the same search, priced in parameters
            source_params = count_params(model)

            def params_of(cfg: LocateConfig) -> float:
                return count_params(build(cfg)[1]) / source_params

            cost_of, cost, target = params_of, "params", config.target_params

        accuracy_of, min_acc = None, None
        if config.max_accuracy_drop is not None:
            if val_images is None or val_labels is None:
                raise ModelLegoError("`max_accuracy_drop` needs `val_images` and `val_labels`")
            src_logits = predict_logits(model, val_images)
            restricted = accuracy_from_logits(src_logits, val_labels, output_classes,
                                              restrict_to=classes).accuracy
            min_acc = restricted - config.max_accuracy_drop / 100

            def accuracy_of(cfg: LocateConfig) -> float:
                comp = build(cfg)[1]
                return accuracy_from_logits(predict_logits(comp, val_images), val_labels,
                                            classes).accuracy

        chosen, trials = search(method.candidates(base), cost_of, accuracy_of,
                                min_accuracy=min_acc, max_flops_ratio=target, cost=cost)
        if config.refine and min_acc is not None and accuracy_of is not None:
            # (refine needs the accuracy budget: validate() checked it is given)
            # the layers whose inputs cost most in the component found so far
            macs = macs_by_layer(build(chosen)[1], input_shape)
            kinds = {lay.name: lay.kind for lay in profiled_layers(graph)}
            order = sorted((n for n in macs if n in kinds), key=lambda n: -macs[n])[:8]
            default = {"conv": chosen.beta_conv, "linear": chosen.beta_linear}
            chosen, more = refine(chosen, [(n, default[kinds[n]]) for n in order], flops_of,
                                  accuracy_of, min_acc)
            trials = trials + more
    plan, component = build(chosen)
    return Component(component, plan, classes, selection, profile, graph, chosen,
                     tuple(t.to_dict() for t in trials), method.name,
                     fits[-1] if fits else None, chunk_masks,
                     1 if chunk_masks is None else -(-len(classes) // per_chunk))


def statistics_bytes(layers: Mapping[str, nn.Module]) -> int:
    """Bytes of one class's profile statistics: a float64 ``Q x P`` per profiled layer."""
    total = 0
    for module in layers.values():
        w = cast(torch.Tensor, module.weight)
        total += int(w.shape[0]) * int(w.shape[1]) * 8
    return total


def classes_per_chunk(layers: Mapping[str, nn.Module]) -> int:
    """How many classes one profile may hold within :func:`~modellego.data.lazy.max_memory`
    (a third of it for the statistics: the running sums, a chunk's sums and the copies
    locating makes)."""
    return max(1, max_memory() // (3 * max(1, statistics_bytes(layers))))


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
    of all classes) and ``masks[config][class]``."""
    chunks = [tuple(classes[a:a + per_chunk]) for a in range(0, len(classes), per_chunk)]
    masks: dict[LocateConfig, dict[int, dict[int, torch.Tensor]]] = {c: {} for c in configs}
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
                for c in part:
                    masks[cfg][c] = method.class_masks(graph, prof, c, output_classes, cfg)
            for name, m in prof.means.items():  # means of a chunk: its signed sums / n
                add = m * len(idx)
                signed[name] = signed[name] + add if name in signed else add
            samples.update(prof.samples)
            seconds += prof.seconds
            total += len(idx)
            del prof
            bar.update(1)
    means = {name: v / max(1, total) for name, v in signed.items()}
    return ContributionProfile(tuple(classes), {}, samples, seconds, means), masks
