"""Fair evaluation of a model file on a dataset's test split."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .data import canonical_name, dataset_info, dataset_info_for, load_split_for, model_input
from .errors import ModelLegoError
from .manifest import Manifest, as_manifest
from .metrics import accuracy_from_logits, count_flops, count_params, cpu_latency_ms, predict_logits
from .records import EvaluationReport
from .runtime.device import placed


def check_dataset_matches(manifest: Manifest, dataset: str, info) -> None:
    """Refuse a dataset the model was not made for (other name or other input shape)."""
    own = manifest.own_dataset.name
    if dataset != own:
        shapes = ""
        if tuple(info.input_shape) != manifest.input.shape:
            shapes = (f"; its images have shape {list(info.input_shape)} but the model "
                      f"expects {list(manifest.input.shape)}")
        raise ModelLegoError(
            f"`dataset`: the model classifies dataset {own!r}, not {dataset!r}{shapes}; "
            f"pass `dataset` {own} (class ids are dataset-specific)")
    made_on = manifest.own_dataset.input_shape
    if tuple(info.input_shape) != made_on:
        raise ModelLegoError(
            f"dataset {dataset!r} gives inputs of shape {list(info.input_shape)} but the model "
            f"was made on images of shape {list(made_on)} (channels, height, width); its "
            "images changed since the model was made: restore them, or retrain on the new "
            "images")


def evaluate(model: nn.Module, manifest: Manifest | Mapping[str, Any], *,
             dataset: str | None = None,
             classes: Sequence[int] | None = None, data_dir: str | None = None,
             split: str = "test", latency: bool = True) -> EvaluationReport:
    """Accuracy (overall, per class), params, FLOPs and CPU latency of a model.

    Args:
        model: the network, as :func:`modellego.load_model` returns it.
        manifest: its manifest.
        dataset: the dataset to read (default: the manifest's).
        classes: only the images of these classes.
        data_dir: where the dataset's files are.
        split: ``"test"``, ``"val"`` or ``"train"``.
        latency: also measure the CPU latency.

    Returns:
        The report: accuracies, per-class accuracies, params, FLOPs and latency.

    ``classes`` limits the images to those classes and adds ``restricted_accuracy``: the
    argmax taken over those classes' outputs only.
    """
    manifest = as_manifest(manifest)
    spec = manifest.own_dataset
    dataset = canonical_name(dataset or spec.name, data_dir)
    # the model's own dataset is read as it was for the model (a folder at its size)
    info = dataset_info_for(spec, data_dir=data_dir) \
        if dataset == spec.name else dataset_info(dataset, data_dir=data_dir)
    check_dataset_matches(manifest, dataset, info)
    test = load_split_for(spec, split, data_dir=data_dir)
    own = list(manifest.classes)
    chosen = list(classes) if classes is not None else own
    missing = [c for c in chosen if c not in own]
    if missing:
        raise ModelLegoError(f"`classes` {missing} are not outputs of this model; "
                             f"it classifies {own}")
    test = test.subset(chosen)
    if len(test) == 0:
        raise ModelLegoError(f"the {split} split of {dataset!r} has no images of classes "
                             f"{chosen}")
    with placed(model):
        logits = predict_logits(model, model_input(test.images, test.info, manifest.input))
    acc = accuracy_from_logits(logits, test.labels, own)
    shape = manifest.input.shape
    restricted = None if classes is None else accuracy_from_logits(
        logits, test.labels, own, restrict_to=chosen).accuracy
    return EvaluationReport(
        dataset, split, chosen, acc.n, acc.accuracy,
        {str(c): a for c, a in acc.per_class.items()}, count_params(model),
        count_flops(model, shape), restricted_accuracy=restricted,
        latency_ms=cpu_latency_ms(model, shape) if latency else None,
        threads=torch.get_num_threads() if latency else None)
