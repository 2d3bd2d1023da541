"""Assembly: several models or components -> one classifier over the union of their labels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence, cast

import torch
from torch import nn

from .._version import __version__
from ..data.lazy import as_tensor, default_batch
from ..data.registry import check_one_folder, load_split_for
from ..errors import ModelLegoError
from ..kinds import build_from_manifest
from ..manifest import AssemblySpec, DatasetSpec, Manifest, PartSpec, as_manifest
from ..metrics import count_flops, count_params
from ..provenance import require_single
from ..records import AssemblyEvaluation
from ..runtime.distributed import SINGLE, DistContext
from ..runtime.hooks import preserved_state
from .adapters import InputAdapter, contract_shape, convert_images
from .layouts import LAYOUT_REGISTRY, ParallelBody, get_layout
from .parts import Part
from .routing import routing_metrics
from .scalings import SCALING_REGISTRY, default_scaling, get_scaling
from .scoring import pooled

#: the registered layouts' and scalings' names (see :mod:`.layouts`, :mod:`.scalings`)
LAYOUTS = LAYOUT_REGISTRY.names()
SCALINGS = SCALING_REGISTRY.names()
DUPLICATES = ("error", "replace")


@dataclass(frozen=True)
class AssemblyConfig:
    """How to assemble; calibration uses ``calibration_samples`` training images per class."""

    layout: str = "parallel"
    #: ``None``: :func:`~modellego.assembly.scalings.default_scaling` of the parts
    #: (``concern`` when a part has a one-vs-rest head, else ``joint``)
    scaling: str | None = None
    on_duplicate: str = "error"
    calibration_samples: int = 3000
    max_taps: int = 8
    seed: int = 0

    def validate(self) -> None:
        for name, allowed in (("layout", LAYOUTS), ("scaling", SCALINGS),
                              ("on_duplicate", DUPLICATES)):
            value = getattr(self, name)
            if value not in allowed and not (name == "scaling" and value is None):
                raise ModelLegoError(f"`{name}` must be one of {', '.join(allowed)}, "
                                     f"got {value!r}")
        if self.calibration_samples < 2:
            raise ModelLegoError("`calibration_samples` must be >= 2")
        get_layout(self.layout).check(get_scaling(self.scaling or "joint"))


def _outputs(part: Part | PartSpec | Manifest | Mapping[str, Any]
             ) -> tuple[str, Sequence[int], Sequence[str]]:
    """A part's (or a model's manifest's) dataset name, classes and class names."""
    if isinstance(part, Part):
        part = part.entry
    if isinstance(part, Manifest):
        return part.own_dataset.name, part.classes, part.class_names
    if isinstance(part, PartSpec):
        return part.dataset.name, part.classes, part.class_names
    return part["dataset"]["name"], part["classes"], part["class_names"]


def label_map(parts: Sequence[Part | PartSpec | Manifest | Mapping[str, Any]],
              on_duplicate: str
              ) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The assembled outputs (in order) and, per part, which of its outputs are kept.

    A label is a (dataset, class id) pair. With ``on_duplicate="replace"`` a later part's
    output replaces an earlier part's output for the same label.
    """
    owner: dict[tuple[str, int], tuple[int, int]] = {}
    outputs = [_outputs(man) for man in parts]
    for k, (ds, classes, names) in enumerate(outputs):
        for i, c in enumerate(classes):
            key = (ds, int(c))
            if key in owner and on_duplicate == "error":
                raise ModelLegoError(
                    f"part {owner[key][0]} and part {k} both classify {ds} class {c} "
                    f"({names[i]}); pass `on_duplicate` replace to keep the "
                    "later part's output for it")
            owner[key] = (k, i)
    columns: list[list[int]] = [[] for _ in parts]
    labels = []
    for k, (ds, classes, names) in enumerate(outputs):
        for i, c in enumerate(classes):
            if owner[(ds, int(c))] == (k, i):
                columns[k].append(i)
                labels.append({"dataset": ds, "class": int(c), "name": names[i],
                               "part": k, "part_output": i})
    return labels, columns


class AssembledModel(nn.Module):
    """Runs every part on its adapted input and combines the (scaled) outputs.

    ``body`` returns one ``(outputs, features)`` pair per part; ``columns`` select each part's
    outputs that the assembly keeps; the scaling (:mod:`.scalings`) combines them.
    ``heads[k]``: part ``k`` answers with one-vs-rest concern scores.
    """

    def __init__(self, body: nn.Module, columns: Sequence[Sequence[int]], scaling: str,
                 routers: Sequence[nn.Module] | None = None,
                 heads: Sequence[bool] | None = None) -> None:
        super().__init__()
        self.body = body
        self.scaling = scaling
        self.rule = get_scaling(scaling)
        self.num_parts = len(columns)
        self.heads = list(heads) if heads is not None else [False] * len(columns)
        for k, cols in enumerate(columns):
            self.register_buffer(f"columns{k}", torch.tensor(list(cols), dtype=torch.long))
            self.register_buffer(f"scale{k}", torch.ones(len(cols)))
        self.routers = nn.ModuleList(routers or [])
        #: the kept outputs come from the manifest's labels: a file must hold exactly these
        self.fixed_buffers = tuple(f"columns{k}" for k in range(len(columns)))

    def part_columns(self, k: int) -> torch.Tensor:
        """The outputs of part ``k`` the assembly keeps."""
        return getattr(self, f"columns{k}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.body(x))

    def combine(self, outs: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> torch.Tensor:
        """The assembled logits from the body's per-part ``(logits, features)``."""
        return self.rule.combine(self, outs)


def _structure(parts: Sequence[Part], config: AssemblyConfig, contract: Sequence[int],
               columns: list[list[int]], taps: list[list[str]] | None,
               spec: dict[str, Any] | None, *, weights: bool) -> AssembledModel:
    if config.scaling is None:  # assemble_models() resolves it; a manifest records it resolved
        raise ModelLegoError("unknown scaling None; use one of "
                             f"{', '.join(SCALING_REGISTRY.names())}")
    scaling = get_scaling(config.scaling)
    adapters = [InputAdapter(contract, p.entry.input.to_dict()) for p in parts]
    body = get_layout(config.layout).body(adapters, parts, taps, spec, weights=weights)
    return AssembledModel(body, columns, scaling.name, scaling.routers(parts, taps),
                          [bool(p.entry.head) for p in parts])


def as_parts(parts: Sequence[Part | tuple]) -> list[Part]:
    """Parts given as :class:`Part` records or as ``(model, manifest)`` or ``(model, manifest,
    fingerprint tensors)`` tuples, checked to be single models or components."""
    if len(parts) < 2:
        raise ModelLegoError("assembly needs at least two parts")
    out = []
    for k, part in enumerate(parts):
        if not isinstance(part, Part):
            net, man, *rest = part
            require_single(as_manifest(man, source=f"part {k}"), "assemble",
                           where=f"part {k}", hint="; assemble its parts instead")
            part = Part.of(net, man, fingerprint=rest[0] if rest else None)
        out.append(part)
    return out


def resolved(config: AssemblyConfig | None, parts: Sequence[Part]) -> AssemblyConfig:
    """``config`` (default :class:`AssemblyConfig`) validated, with its scaling resolved for
    ``parts`` (:func:`~modellego.assembly.scalings.default_scaling` when not given)."""
    config = config or AssemblyConfig()
    config.validate()
    if config.scaling is None:  # recorded resolved, as if it had been given
        config = replace(config, scaling=default_scaling(parts))
        config.validate()
    return config


def checked_labels(parts: Sequence[Part], config: AssemblyConfig
                   ) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """:func:`label_map` of ``parts``, refused when a part keeps no output, or when the
    (resolved) layout or scaling of ``config`` cannot take the parts: all that is checked
    before any data is read."""
    labels, columns = label_map(parts, config.on_duplicate)
    if any(len(c) == 0 for c in columns):
        k = next(i for i, c in enumerate(columns) if not c)
        raise ModelLegoError(f"part {k} has no outputs left after `on_duplicate` replace; "
                             "drop it from the assembly")
    get_layout(config.layout).check_parts(parts)
    get_scaling(str(config.scaling)).check_parts(parts)
    return labels, columns


def assemble_models(parts: Sequence[Part | tuple], config: AssemblyConfig | None = None, *,
                    calibration: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                    base: Mapping[str, float] | None = None, command: str | None = None,
                    dist: DistContext = SINGLE) -> tuple[AssembledModel, Manifest]:
    """Assemble networks in memory into one classifier over the union of their labels.

    Args:
        parts: two or more :class:`~modellego.assembly.parts.Part` records, or
            ``(model, manifest)`` / ``(model, manifest, fingerprint tensors)`` tuples.
        config: layout, scaling and the rest (default :class:`AssemblyConfig`).
        calibration: per part, training images of its classes in the assembly's input
            contract and their indices among the part's outputs; needed when the scaling
            calibrates (:func:`modellego.workflows.assembly.calibration_images` reads them),
            else unused.
        base: per label (``"dataset:class"``), each part's own accuracy on its classes'
            test images; needed when the layout's body is not the parts themselves (union),
            on which Base cannot be measured afterwards
            (:func:`modellego.workflows.assembly.parts_base` measures it).
        command: the command line recorded in the provenance.
        dist: the data-parallel context under ``torchrun``.

    Returns:
        ``(model, manifest)``: the assembled network (eval mode) and its manifest.

    >>> model, manifest = assemble_models([(net_a, man_a), (net_b, man_b)],
    ...                                   AssemblyConfig(scaling="none"))
    """
    parts = as_parts(parts)
    config = resolved(config, parts)
    labels, columns = checked_labels(parts, config)
    layout, scaling = get_layout(config.layout), get_scaling(str(config.scaling))
    if scaling.calibrates and calibration is None:
        raise ModelLegoError(f"scaling {scaling.name} calibrates on training images of each "
                             "part's classes: pass `calibration`, or use a scaling that does "
                             "not calibrate")
    if not layout.body_is_parts and base is None:
        raise ModelLegoError(f"`layout` {layout.name} needs Base measured on the parts before "
                             "they are merged: pass `base`")
    contract = contract_shape([p.entry.input.to_dict() for p in parts])
    taps = scaling.taps(parts, config.max_taps)
    spec = layout.spec(parts)
    model = _structure(parts, config, contract, columns, taps, spec, weights=True).eval()
    calib = scaling.fit(model, parts, list(calibration or []), config, taps, dist)
    return model, _manifest(parts, config, model, contract, labels, taps, spec, base, calib,
                            command)


def _manifest(parts: Sequence[Part], config: AssemblyConfig, model: AssembledModel,
              contract: Sequence[int], labels: list[dict[str, Any]],
              taps: list[list[str]] | None, spec: dict[str, Any] | None,
              base: Mapping[str, float] | None, calibration: dict[str, Any],
              command: str | None) -> Manifest:
    """The manifest of an assembly :func:`assemble_models` made."""
    # every layout's body keeps the parts' input adapters in a ModuleList ``adapters``
    adapters = cast("Sequence[InputAdapter]", model.body.adapters)
    shape = list(contract)
    return Manifest.for_assembly(
        layout=config.layout, scaling=str(config.scaling), parts=[p.to_dict() for p in parts],
        labels=labels, taps=taps, union=spec,
        base=None if get_layout(config.layout).body_is_parts else {
            "per_class": dict(base or {}), "measured_on": "each component alone, test split"},
        input={"shape": shape, "mean": [0.0] * shape[0], "std": [1.0] * shape[0],
               "range": "[0, 1]", "adapters": [a.describe() for a in adapters]},
        provenance={"made_by": "modellego assemble", "command": command,
                    "config": {k: v for k, v in config.__dict__.items()},
                    "calibration": calibration, "modellego_version": __version__})


def build_assembly(manifest: Mapping[str, Any]) -> nn.Module:
    """The (untrained) network of an assembly's manifest, its weights to be loaded."""
    parts = [Part(build_from_manifest(p).eval(), p) for p in manifest["parts"]]
    columns: list[list[int]] = [[] for _ in parts]
    for lab in manifest["labels"]:
        columns[lab["part"]].append(lab["part_output"])
    config = AssemblyConfig(layout=manifest["layout"], scaling=manifest["scaling"])
    return _structure(parts, config, manifest["input"]["shape"], columns,
                      manifest.get("taps"), manifest.get("union"), weights=False)


def _assembly_of(manifest: Manifest | Mapping[str, Any]) -> tuple[Manifest, AssemblySpec]:
    """``manifest`` (typed) and what only an assembly has; refused for other kinds."""
    manifest = as_manifest(manifest)
    if manifest.assembly is None:
        raise ModelLegoError(f"this is a {manifest.kind}, not an assembly; evaluate it with "
                             "modellego.evaluate")
    return manifest, manifest.assembly


def union_test_set(manifest: Manifest | Mapping[str, Any], *, data_dir: str | None = None,
                   split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Contract images and assembled output indices of every label's test images."""
    manifest, spec = _assembly_of(manifest)
    contract = manifest.input.shape
    by_dataset: dict[str, list[tuple[int, int]]] = {}
    specs: dict[str, tuple[int, DatasetSpec]] = {}
    for idx, lab in enumerate(spec.labels):
        by_dataset.setdefault(lab.dataset, []).append((lab.class_id, idx))
        specs.setdefault(lab.dataset, (lab.part, spec.parts[lab.part].dataset))
    xs, ys = [], []
    for ds, pairs in by_dataset.items():
        k, dataset = specs[ds]
        test = load_split_for(dataset, split, data_dir=data_dir, where=f"part {k}")
        for c, idx in pairs:
            sel = test.labels == c
            xs.append(convert_images(as_tensor(test.images[sel], "the assembly's evaluation"),
                                     contract[0], contract[1:]))
            ys.append(torch.full((int(sel.sum()),), idx, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def evaluate_assembly(model: AssembledModel, manifest: Manifest | Mapping[str, Any], *,
                      data_dir: str | None = None, batch_size: int | None = None
                      ) -> AssemblyEvaluation:
    """Assembled accuracy on the union of the parts' test images, and Base: the mean of the
    parts' own per-class accuracies on their own classes (argmax over each part's outputs).

    Args:
        model: the assembled network.
        manifest: its manifest.
        data_dir: where the parts' datasets are.
        batch_size: images per forward pass (default: bounded by the memory budget).

    Returns:
        The report: accuracy, balanced accuracy, Base, per-class accuracies and routing.

    One pass: each part's raw logits give Base, the combined logits give the accuracy and
    ``routing`` (:func:`~modellego.assembly.routing.routing_metrics`: routing accuracy and
    AUROCs, and the accuracy with perfect routing, so that the loss against Base splits into
    routing and the parts' own classification).
    """
    manifest, spec = _assembly_of(manifest)
    check_one_folder([p.dataset.name for p in spec.parts], data_dir)
    x, y = union_test_set(manifest, data_dir=data_dir)
    batch_size = batch_size or default_batch(x.shape[1:])
    combined: list[torch.Tensor] = []
    part_preds: list[list[torch.Tensor]] = [[] for _ in spec.parts]
    with preserved_state(model), torch.inference_mode():
        model.eval()
        for i in range(0, len(x), batch_size):
            outs = model.body(x[i:i + batch_size])
            combined.append(model.combine(outs).float())
            for k, (logits, _) in enumerate(outs):
                part_preds[k].append(logits.argmax(1))
    assembled = torch.cat(combined)
    correct = assembled.argmax(1) == y
    per_label = {}
    base = {}
    for idx, lab in enumerate(spec.labels):
        sel = y == idx
        per_label[lab.key] = float(correct[sel].double().mean())
        own = torch.tensor(spec.parts[lab.part].classes)[torch.cat(part_preds[lab.part])[sel]]
        base[lab.key] = float((own == lab.class_id).double().mean())
    if not get_layout(spec.layout).body_is_parts and spec.base is not None:
        # the body is not the parts: Base was measured on them before they were merged
        base = dict(spec.base.per_class)
    shape = manifest.input.shape
    balanced = sum(per_label.values()) / len(per_label)
    blocks = [[i for i, lab in enumerate(spec.labels) if lab.part == k]
              for k in range(len(spec.parts))]
    routing = routing_metrics(assembled, y, blocks)
    base_mean = sum(base.values()) / len(base)
    routing["routing_loss_pp"] = 100 * (routing["oracle_balanced_accuracy"] - balanced)
    routing["classification_loss_pp"] = 100 * (base_mean - routing["oracle_balanced_accuracy"])
    return AssemblyEvaluation(int(len(y)), float(correct.double().mean()), balanced,
                              base_mean, base, per_label, count_params(model),
                              count_flops(model, shape), routing)


__all__ = ["LAYOUTS", "SCALINGS", "AssembledModel", "AssemblyConfig", "ParallelBody", "Part",
           "assemble_models", "evaluate_assembly", "label_map", "pooled", "union_test_set"]
