"""Knowledge distillation: train a small registry architecture to mimic a model or component.

The student classifies the teacher's classes, in the teacher's output order, and is trained
on the training images of those classes with ``alpha * T^2 * KL(teacher_T || student_T) +
(1 - alpha) * cross-entropy`` (Hinton et al.'s soft targets at temperature T). The teacher
sees exactly the (augmented) batch the student sees and is never changed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .data import (
    DatasetInfo,
    Inputs,
    as_tensor,
    dataset_info_for,
    load_split_for,
    model_input,
    normalize,
)
from .data.base import reads_as_dataset
from .errors import ModelLegoError
from .evaluation import check_dataset_matches
from .manifest import Manifest, as_manifest
from .metrics import accuracy_from_logits, count_flops, count_params, predict_logits
from .models import create_model, list_models
from .provenance import provenance, require_single, source_record
from .records import DistillReport
from .runtime.device import device_of, on_current_device
from .runtime.hooks import preserved_state
from .terminal import printable
from .training import (
    augmentation,
    check_classes,
    check_lr,
    check_seed,
    fit,
    task_split,
)


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines a distillation run (the student's training)."""

    student: str
    width: float = 1.0
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    #: softmax temperature of the soft targets
    temperature: float = 4.0
    #: weight of the distillation term; 0 is plain cross-entropy training
    alpha: float = 0.9
    seed: int = 0
    augment: bool = True

    def validate(self) -> None:
        if self.student not in list_models():
            raise ModelLegoError(f"`student` {self.student!r} is not a registered architecture; "
                                 f"choose one of {', '.join(list_models())}")
        checks = (
            ("`width`", self.width, self.width > 0, "> 0"),
            ("`epochs`", self.epochs, self.epochs >= 1, ">= 1"),
            ("`batch_size`", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("`weight_decay`", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("`temperature`", self.temperature,
             self.temperature > 0 and math.isfinite(self.temperature), "> 0 and finite"),
            ("`alpha`", self.alpha, 0 <= self.alpha <= 1, "in [0, 1] (the weight of the "
             "distillation term; 0 = cross-entropy only)"),
        )
        for flag, value, ok, want in checks:
            if not ok:
                raise ModelLegoError(f"{flag} must be {want}, got {value}")
        check_lr(self.lr)
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _contract_view(info: DatasetInfo, contract: Mapping[str, Any]
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Turn images normalised as dataset ``info``'s into what a network with input
    ``contract`` reads (the identity when the contract is the dataset's)."""
    if reads_as_dataset(info, contract):
        return lambda x: x
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return lambda x: model_input(x * std.to(x) + mean.to(x), info, contract)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            *, temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, targets)``.

    KL is summed over classes and averaged over the batch; the T^2 keeps the soft-target
    gradients on the scale of the cross-entropy's as T changes.
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                  F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student_logits, targets)


def distill(teacher: nn.Module, teacher_manifest: Manifest | Mapping[str, Any],
            config: DistillConfig, *,
            data_dir: str | None = None, command: str | None = None,
            source_path: str | Path | None = None, compare: bool = True,
            progress: bool = False) -> tuple[nn.Module, Manifest, DistillReport]:
    """Train ``config.student`` on the teacher's classes with the teacher's soft targets.

    Args:
        teacher: the teacher network, as :func:`modellego.load_model` returns it.
        teacher_manifest: its manifest.
        config: the student architecture and training.
        data_dir: where the dataset's files are.
        command: the command line recorded in the provenance.
        source_path: the teacher's file, recorded with its SHA-256.
        compare: also train the student alone, for the report.
        progress: show a progress bar.

    Returns:
        ``(student, manifest, report)``.

    Returns the student (eval mode), its manifest (a plain ``"model"`` file) and a report
    comparing teacher, student and -- with ``compare`` -- the same student trained alone
    (same seed, so the same initial weights and batches; cross-entropy only).

    >>> student, manifest, report = distill(*load_model("t.safetensors"),
    ...                                     DistillConfig("simnet", width=0.5, epochs=1))
    >>> manifest.architecture.name
    'simnet'
    """
    config.validate()
    require_single(teacher_manifest, "distil from", where="the teacher",
                   hint="; distil from one of the parts instead")
    teacher_manifest = as_manifest(teacher_manifest, source="the teacher's manifest")
    dataset = teacher_manifest.own_dataset.name
    info, classes, (x_train, y_train), val, test = _teacher_data(teacher_manifest, data_dir)
    x_val = normalize(as_tensor(val.images, "distillation"), info)
    x_test = normalize(as_tensor(test.images, "distillation"), info)
    # the student reads the dataset's images; the teacher may read them in another form
    # (an imported network at 224 px, say): its inputs are converted on the way in
    contract = teacher_manifest.input
    as_teacher = _contract_view(info, contract.to_dict())
    x_teacher_test = model_input(test.images, info, contract)
    c, h, _ = info.input_shape
    kwargs = {"in_channels": c, "num_classes": len(classes), "input_size": h,
              "width": config.width}
    pad, flip = augmentation(dataset, h, config.augment)
    data = (x_train, y_train, x_val, val.labels, classes)

    def measured(model: nn.Module, x: Inputs) -> dict[str, Any]:
        """Accuracy on the test images ``x`` (as ``model`` reads them), params, FLOPs."""
        acc = accuracy_from_logits(predict_logits(model, x), test.labels, classes)
        return {"accuracy": acc.accuracy, "params": count_params(model),
                "flops": count_flops(model, list(x.shape[1:])),
                "per_class": {str(k): v for k, v in acc.per_class.items()}}

    def soft_loss(logits: torch.Tensor, targets: torch.Tensor,
                  inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            t = teacher(as_teacher(inputs))
        return kd_loss(logits, t.clone(), targets, temperature=config.temperature,
                       alpha=config.alpha)

    t0 = time.perf_counter()
    home = device_of(teacher)
    with preserved_state(teacher):
        teacher.eval()
        try:  # the teacher runs where the student trains (see modellego.runtime.device)
            on_current_device(teacher)
            teacher_row = measured(teacher, x_teacher_test)
            student, kd_row, history = _train_student(config, kwargs, data, pad, flip,
                                                      soft_loss, progress)
        finally:
            teacher.to(home)
    kd_row.update(measured(student, x_test))
    teacher_entry = {"file": str(source_path) if source_path else None,
                     "kind": teacher_manifest.kind,
                     "architecture": teacher_manifest.own_architecture.name, **teacher_row}
    alone_row = None
    if compare:
        alone, alone_row, _ = _train_student(config, kwargs, data, pad, flip, None, progress)
        alone_row.update(measured(alone, x_test))
    report = DistillReport(dataset, list(classes), len(test), teacher_entry, kd_row,
                           config.epochs, config.to_dict(), time.perf_counter() - t0,
                           student_alone=alone_row)
    manifest = _student_manifest(teacher_manifest, info, classes, kwargs, config, kd_row,
                                 history, command=command, source_path=source_path)
    return student, manifest, report


def _teacher_data(teacher_manifest: Manifest, data_dir: str | None) -> tuple:
    """The teacher's dataset, its classes, the training images and labels of those classes,
    and their validation and test splits (each refused when empty)."""
    spec = teacher_manifest.own_dataset
    info = dataset_info_for(spec, data_dir=data_dir)
    check_dataset_matches(teacher_manifest, spec.name, info)
    train_split = load_split_for(spec, "train", data_dir=data_dir, where="the teacher")
    classes = teacher_manifest.classes
    check_classes(classes, info.num_classes, "the teacher's classes")
    x_train, y_train = task_split(train_split, classes)
    val = load_split_for(spec, "val", data_dir=data_dir, where="the teacher").subset(classes)
    test = load_split_for(spec, "test", data_dir=data_dir, where="the teacher").subset(classes)
    for name, n in (("train", len(y_train)), ("validation", len(val)), ("test", len(test))):
        if n == 0:
            raise ModelLegoError(f"dataset {spec.name!r} has no {name} images of the "
                                 f"teacher's classes {list(classes)}; add images or use "
                                 "another teacher")
    return info, classes, (x_train, y_train), val, test


def _train_student(config: DistillConfig, kwargs: dict[str, Any], data: tuple, pad: int,
                   flip: bool, loss_fn, progress: bool
                   ) -> tuple[nn.Module, dict[str, Any], list[dict]]:
    """A fresh student trained as :func:`modellego.training.train` would, with ``loss_fn``."""
    x_train, y_train, x_val, y_val, classes = data
    torch.manual_seed(config.seed)  # same order of draws as train(): init, then batches
    gen = torch.Generator().manual_seed(config.seed)
    model = create_model(config.student, **kwargs)
    t0 = time.perf_counter()
    best_acc, best_epoch, history = fit(
        model, x_train, y_train, x_val, y_val, classes, epochs=config.epochs,
        batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        pad=pad, flip=flip, gen=gen, progress=progress, loss_fn=loss_fn)
    row = {"val_accuracy": best_acc, "best_epoch": best_epoch,
           "train_seconds": time.perf_counter() - t0}
    return model, row, history


def _student_manifest(teacher_manifest: Manifest, info, classes: tuple[int, ...],
                      kwargs: dict[str, Any], config: DistillConfig, row: dict[str, Any],
                      history: list[dict], *, command: str | None,
                      source_path: str | Path | None) -> Manifest:
    dataset = info.to_dict()
    teacher_dataset = teacher_manifest.own_dataset.to_dict()
    if "fingerprint" in teacher_dataset:  # trained on the teacher's (checked) data
        dataset["fingerprint"] = teacher_dataset["fingerprint"]
    return Manifest.for_model(
        architecture={"name": config.student, "kwargs": kwargs}, dataset=dataset,
        classes=classes,
        metrics={"val_accuracy": row["val_accuracy"], "test_accuracy": row["accuracy"],
                 "test_per_class": row["per_class"]},
        provenance=provenance(
            "modellego distill", command,
            teacher={**source_record(teacher_manifest, source_path),
                     "architecture": teacher_manifest.own_architecture.name},
            config=config.to_dict(), best_epoch=row["best_epoch"], history=history,
            torch_version=torch.__version__))


def format_distill(report: DistillReport) -> str:
    """A plain-text table: teacher, student with distillation, student alone."""
    cfg = report.config
    lines = [f"classes {list(report.classes)} of {printable(report.dataset)} "
             f"({report.n} test images); "
             f"student {cfg['student']} (width {cfg['width']}), {report.epochs} epochs, "
             f"T = {cfg['temperature']}, alpha = {cfg['alpha']}",
             f"  {'':<15} {'accuracy':>8} {'params':>12} {'FLOPs':>14}"]
    for r, label in ((report.teacher, "teacher"), (report.student_kd, "student + KD"),
                     (report.student_alone, "student alone")):
        if r is not None:
            lines.append(f"  {label:<15} {r['accuracy']:>8.4f} {r['params']:>12,} "
                         f"{r['flops']:>14,}")
    lines.append(f"  {report.seconds:.1f} s")
    return "\n".join(lines)
