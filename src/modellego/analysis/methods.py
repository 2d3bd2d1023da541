"""Disassembly methods: how a component's channels are scored and chosen.

A method is one small class registered under its name in :data:`METHOD_REGISTRY`. It knows its
default thresholds, which samples it profiles (all selected ones, or correctly classified
ones only), how it profiles them, how it turns a profile into keep-masks, the family of
thresholds a search walks, whether bias compensation and per-layer refining apply, which
logits the component keeps and what head answers for it. A new method is one subclass of
:class:`Method` plus one ``METHOD_REGISTRY.register`` call.

``contribution``: Model LEGO (NeurIPS'24); ``contribution-2022``: the ICLR'23 contribution
paradigm (correctly classified samples only, un-centred normalisation); ``frat``: CNN LEGO
v1 (gradients of the predicted-class probability, :mod:`modellego.analysis.frat`);
``pan-rajan``: Pan & Rajan's one-vs-rest modules (never-active channels removed,
:mod:`modellego.analysis.activity`, concern-score head :mod:`modellego.surgery.head`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..data.lazy import Inputs
from ..errors import ModelLegoError
from ..registry import Registry
from ..runtime.distributed import DistContext
from ..surgery.graph import ChannelGraph
from ..surgery.head import ONE_VS_REST, apply_head
from .activity import ActivityProfile, active_class_masks, active_locate, activity_profile
from .frat import GradientProfile, frat_class_masks, frat_locate, gradient_profile
from .locate import LocateConfig, locate, locate_class
from .profile import ContributionProfile, contribution_profile
from .search import FRAT_SCALES, alpha_family, rule_family

Masks = dict[int, torch.Tensor]
#: the end of a plan error's advice that suggests the mass rule (left out where it is in use)
USE_MASS_RULE = ", or use `rule` mass"

#: what a method's profile pass returns
Profile = ContributionProfile | GradientProfile | ActivityProfile


class Method:
    """The contribution method (Model LEGO); other methods override what differs."""

    name = "contribution"
    #: only correctly classified samples may be selected
    correct_only = False
    #: ``compensate`` applies (it needs the contribution profile's means)
    compensate = True
    #: ``refine`` applies (it tightens per-layer betas)
    refine = True
    #: the task's masks are the OR of its classes' :meth:`class_masks`, so a profile of many
    #: classes may be made and read in chunks of classes
    chunkable = True
    #: the component's head (``None``: it answers with its task logits)
    head: str | None = None
    #: :meth:`locate` honours ``LocateConfig.task_level`` (a search may locate a task of
    #: several classes as one class)
    task_level = True
    #: appended to a plan error (a layer left empty)
    hint = ("; lower `beta_conv`/`beta_linear` (or `alpha_conv`/`alpha_linear`) and try "
            "again" + USE_MASS_RULE)

    def default_locate(self) -> LocateConfig:
        """The thresholds used unless given."""
        return LocateConfig()

    def compress_locate(self) -> LocateConfig | None:
        """The thresholds a compression (all classes) searches from; ``None``: the
        defaults."""
        return None

    def prepare(self, base: LocateConfig) -> LocateConfig:
        """The thresholds actually used for ``base`` (a method may pin some fields)."""
        return base

    def profile(self, model: nn.Module, layers: Mapping[str, nn.Module], images: Inputs,
                labels: torch.Tensor, classes: Sequence[int], *, batch_size: int,
                dist: DistContext | None) -> Profile:
        """The per-class statistics locating reads, from the selected samples."""
        return contribution_profile(model, layers, images, labels, classes,
                                    batch_size=batch_size, dist=dist)

    def locate(self, graph: ChannelGraph, profile: Any, classes: Sequence[int],
               output_classes: Sequence[int], config: LocateConfig) -> Masks:
        """The task's keep-mask of every channel space."""
        return locate(graph, profile, classes, output_classes, config)

    def class_masks(self, graph: ChannelGraph, profile: Any, c: int,
                    output_classes: Sequence[int], config: LocateConfig) -> Masks:
        """One class's keep-masks, its logit marked (for route diagrams)."""
        return locate_class(graph, profile, list(output_classes).index(c), c, config)

    def candidates(self, base: LocateConfig) -> list[LocateConfig]:
        """The thresholds a search walks, most aggressive first."""
        return rule_family(base)

    def output_indices(self, classes: Sequence[int], output_classes: Sequence[int]
                       ) -> list[int]:
        """The source logits the component keeps, in its output order."""
        output_classes = list(output_classes)
        return [output_classes.index(c) for c in classes]

    def finish(self, net: nn.Module, classes: Sequence[int]) -> nn.Module:
        """The component from the sliced network (e.g. with a head)."""
        return apply_head(net, self.head, len(classes))

    def check(self, compensate: bool, refine: bool) -> None:
        """Refuse options that do not apply to this method."""
        if compensate and not self.compensate:
            raise ModelLegoError(f"`compensate` needs the contribution profile, which "
                                 f"`method` {self.name} does not compute; drop `compensate` "
                                 "or use another method")
        if refine and not self.refine:
            raise ModelLegoError(f"`refine` tightens per-layer betas, which `method` "
                                 f"{self.name} does not use; drop `refine` or use another "
                                 "method")


class Contribution(Method):
    """Model LEGO's relative contribution (the default)."""

    def compress_locate(self) -> LocateConfig | None:
        return LocateConfig(rule="mass")  # the mass rule's family reaches FLOPs targets


class Contribution2022(Method):
    """The ICLR'23 paradigm: correctly classified samples, normalised by the max."""

    name = "contribution-2022"
    correct_only = True

    def default_locate(self) -> LocateConfig:
        return LocateConfig(normalize="max")

    def prepare(self, base: LocateConfig) -> LocateConfig:
        return replace(base, normalize="max")


class AlphaMethod(Method):
    """A method with one threshold per layer kind, ``alpha_conv``/``alpha_linear`` (betas
    unused), a per-class profile and per-class masks OR-ed over the task: the subclass names
    its ``alpha`` default and the three functions (profile, task masks, class masks)."""

    compensate = False
    refine = False
    chunkable = False
    task_level = False
    alpha = 0.2

    @staticmethod
    def profile_pass(model, layers, images, labels, classes, *, batch_size, dist):
        raise NotImplementedError

    @staticmethod
    def task_masks(graph, profile, classes, config):
        raise NotImplementedError

    @staticmethod
    def masks_of_class(graph, profile, c, config, output_index):
        raise NotImplementedError

    def default_locate(self) -> LocateConfig:
        return LocateConfig(alpha_conv=self.alpha, alpha_linear=self.alpha)

    def profile(self, model, layers, images, labels, classes, *, batch_size, dist):
        return self.profile_pass(model, layers, images, labels, classes,
                                 batch_size=batch_size, dist=dist)

    def locate(self, graph, profile, classes, output_classes, config):
        return self.task_masks(graph, profile, classes, config)

    def class_masks(self, graph, profile, c, output_classes, config):
        return self.masks_of_class(graph, profile, c, config, list(output_classes).index(c))

    def candidates(self, base: LocateConfig) -> list[LocateConfig]:
        return alpha_family(base, FRAT_SCALES)


class Frat(AlphaMethod):
    """CNN LEGO v1: critical channels from gradients (thresholds ``alpha_*``, betas unused).

    Default 0.2 on the inputs of conv and linear layers: on the shipped Fashion-MNIST
    VGG-16, the largest of 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5 that loses under 1 pp on the
    validation split for the tasks {0,1,2}, {1,7} and {0,2,4,6,8}.
    """

    name = "frat"
    hint = "; lower `alpha_conv`/`alpha_linear` and try again"
    profile_pass = staticmethod(gradient_profile)
    task_masks = staticmethod(frat_locate)
    masks_of_class = staticmethod(frat_class_masks)


class PanRajan(AlphaMethod):
    """Pan & Rajan (ICSE'22): one-vs-rest modules without the channels a class never uses.

    ``alpha_conv``/``alpha_linear`` are the activity thresholds (share of the layer input's
    largest peak, default 0.01; betas unused), see :mod:`modellego.analysis.activity`. The
    component keeps all the source's logits, the task's classes first, and answers with the
    one-vs-rest concern score of each task class (:mod:`modellego.surgery.head`). A task of
    several classes is one module: the channels active for any of its classes, one score
    per class; its argmax is the argmax of the module's task logits (a score grows with its
    logit while the sum over all logits stays). Pan & Rajan's decomposition is the one-class
    modules, composed by :func:`modellego.assembly.assemble` (scaling ``concern``).
    """

    name = "pan-rajan"
    head = ONE_VS_REST
    alpha = 0.01
    hint = "; lower `alpha_conv`/`alpha_linear` (the activity thresholds) and try again"
    profile_pass = staticmethod(activity_profile)
    task_masks = staticmethod(active_locate)
    masks_of_class = staticmethod(active_class_masks)

    def output_indices(self, classes, output_classes):
        if len(output_classes) < 2:
            raise ModelLegoError("a one-vs-rest module scores a class against the others; "
                                 "the source has a single output")
        first = super().output_indices(classes, output_classes)
        return first + [i for i in range(len(output_classes)) if i not in first]


#: every disassembly method, by name, in the order the CLI lists them
METHOD_REGISTRY: Registry[Method] = Registry("disassembly method")
for _method in (Contribution(), Contribution2022(), Frat(), PanRajan()):
    METHOD_REGISTRY.register(_method.name, _method)


def get_method(name: str) -> Method:
    """The method registered as ``name``; a one-line error lists the known ones."""
    return METHOD_REGISTRY.get(name)


def candidates(base: LocateConfig, method: str = "contribution") -> list[LocateConfig]:
    """The family of thresholds ``method`` searches, most aggressive first (``frat`` and
    ``pan-rajan`` scale their alphas by :data:`~modellego.analysis.search.FRAT_SCALES`; the
    contribution methods follow ``base.rule``)."""
    return get_method(method).candidates(base)
