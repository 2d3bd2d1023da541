"""``assemble`` on model files: the parts, their calibration images and Base, the assembly,
its evaluation and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..assembly.adapters import contract_shape, convert_images
from ..assembly.core import (
    AssembledModel,
    AssemblyConfig,
    as_parts,
    assemble_models,
    checked_labels,
    evaluate_assembly,
    label_map,
    resolved,
)
from ..assembly.layouts import get_layout
from ..assembly.parts import Part
from ..assembly.scalings import get_scaling
from ..data import model_input
from ..data.lazy import as_tensor
from ..data.registry import check_one_folder, load_split_for
from ..errors import ModelLegoError
from ..files import open_model
from ..manifest import Manifest
from ..metrics import predict_logits
from ..models.sources import trusted
from ..records import AssemblyReport
from ..runtime.distributed import SINGLE, DistContext


def assemble(sources: Sequence[str | Path | tuple | Part],
             config: AssemblyConfig | None = None, *, data_dir: Any = None,
             command: str | None = None, dist: DistContext = SINGLE,
             trust_code: Sequence[str] | str | None = None, evaluate: bool = True
             ) -> tuple[AssembledModel, Manifest, AssemblyReport]:
    """Assemble model files into one classifier, as ``modellego assemble`` does.

    Args:
        sources: two or more model or component files, or in-memory parts (``(model,
            manifest)`` or ``(model, manifest, fingerprint tensors)`` tuples, or
            :class:`~modellego.assembly.parts.Part` records).
        config: layout, scaling and the rest (default :class:`AssemblyConfig`).
        data_dir: where the parts' datasets are (calibration, Base, evaluation); scaling
            ``fingerprint`` without ``evaluate`` reads none.
        command: the command line recorded in the provenance.
        dist: the data-parallel context under ``torchrun`` (only rank 0 evaluates).
        trust_code: modules that files with ``python:`` architectures may import (see
            :func:`modellego.open_model`).
        evaluate: measure the assembly on the union of its parts' test images and record
            the accuracies (and Base) in the manifest's metrics.

    Returns:
        ``(model, manifest, report)``; the report holds the evaluation (when made), the
        calibration record and the labels.

    >>> model, manifest, report = assemble(["a.safetensors", "b.safetensors"])
    """
    with trusted(trust_code):  # a union's source may name a python: architecture too
        return _assemble(sources, config, data_dir=data_dir, command=command, dist=dist,
                         evaluate=evaluate)


def _assemble(sources: Sequence[str | Path | tuple | Part], config: AssemblyConfig | None,
              *, data_dir: Any, command: str | None, dist: DistContext, evaluate: bool
              ) -> tuple[AssembledModel, Manifest, AssemblyReport]:
    parts = as_parts([_part(src) for src in sources])
    check_one_folder([p.entry.dataset.name for p in parts], data_dir)
    config = resolved(config, parts)
    checked_labels(parts, config)  # before any data is read
    scaling, layout = get_scaling(str(config.scaling)), get_layout(config.layout)
    calibration = calibration_images(parts, config, data_dir=data_dir) \
        if scaling.calibrates else None
    base = None if layout.body_is_parts else parts_base(parts, config, data_dir=data_dir)
    model, manifest = assemble_models(parts, config, calibration=calibration, base=base,
                                      command=command, dist=dist)
    made = manifest.to_dict()
    result = None
    if evaluate and dist.is_main:
        result = evaluate_assembly(model, manifest, data_dir=data_dir)
        manifest = manifest.updated(metrics={
            "test_accuracy": result.accuracy,
            "test_balanced_accuracy": result.balanced_accuracy, "base": result.base})
    report = AssemblyReport(made["provenance"]["calibration"], made["labels"], result)
    return model, manifest, report


def _part(source: str | Path | tuple | Part) -> Part | tuple:
    """A file opened as a part (in-memory parts pass through)."""
    if not isinstance(source, (str, Path)):
        return source
    loaded = open_model(source)
    return Part.of(loaded.model, loaded.manifest, path=source,
                   fingerprint=loaded.fingerprint)


def calibration_images(parts: Sequence[Part], config: AssemblyConfig, *, data_dir: Any = None
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per part: ``config.calibration_samples`` random training images of each of its
    classes (seeded by ``config.seed``) in the assembly's input contract, and their indices
    among the part's outputs. Training split only: the test split is never used."""
    contract = contract_shape([p.entry.input.to_dict() for p in parts])
    gen = torch.Generator().manual_seed(config.seed)
    data = []
    for k, part in enumerate(parts):
        split = load_split_for(part.entry.dataset, "train", data_dir=data_dir, where=f"part {k}")
        xs, ys = [], []
        for i, c in enumerate(part.entry.classes):
            pos = (split.labels == c).nonzero().flatten()
            if len(pos) == 0:
                raise ModelLegoError(f"no training images of class {c} in "
                                     f"{part.entry.dataset.name} to calibrate with")
            pick = pos[torch.randperm(len(pos), generator=gen)[:config.calibration_samples]]
            xs.append(as_tensor(split.images[pick], "the router's calibration"))
            ys.append(torch.full((len(pick),), i, dtype=torch.long))
        x = convert_images(torch.cat(xs), contract[0], contract[1:])
        data.append((x, torch.cat(ys)))
    return data


def parts_base(parts: Sequence[Part], config: AssemblyConfig, *, data_dir: Any = None
               ) -> dict[str, float]:
    """Base per label (``"dataset:class"``): each part's accuracy on the test images of each
    class it keeps in the assembly, argmax over its own outputs."""
    labels, _ = label_map(parts, config.on_duplicate)
    base = {}
    for k, part in enumerate(parts):
        test = load_split_for(part.entry.dataset, "test", data_dir=data_dir, where=f"part {k}")
        own = [lab for lab in labels if lab["part"] == k]
        sub = test.subset([lab["class"] for lab in own])
        logits = predict_logits(part.net, model_input(sub.images, sub.info, part.entry.input))
        pred_k = torch.tensor(part.entry.classes)[logits.argmax(1)]
        for lab in own:
            sel = sub.labels == lab["class"]
            base[f"{lab['dataset']}:{lab['class']}"] = float(
                (pred_k[sel] == lab["class"]).double().mean())
    return base
