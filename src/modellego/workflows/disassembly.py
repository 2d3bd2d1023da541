"""``disassemble`` on a model file: the task's data, the component, its report and manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ..assembly.fingerprint import fingerprinted
from ..disassembly import Component, DisassemblyConfig, disassemble_model
from ..manifest import Manifest, as_manifest
from ..metrics import accuracy_from_logits, count_flops, count_params, predict_logits
from ..provenance import provenance, require_single, source_record
from ..records import ClassRow, Comparison, DisassemblyReport
from ..runtime.device import device_of, placed
from ..runtime.distributed import DistContext
from .common import STREAMED_POOL_FACTOR, split_images, task_data


def disassemble(model: nn.Module, manifest: Manifest | Mapping[str, Any],
                config: DisassemblyConfig, *,
                source_path: str | Path | None = None, data_dir: str | None = None,
                command: str | None = None, dist: DistContext | None = None,
                reuse: Component | None = None, fingerprint: bool = True,
                ) -> tuple[Component, Manifest, DisassemblyReport]:
    """Disassemble a loaded model file; returns the component, its manifest and the report.

    Args:
        model: the source network, as :func:`modellego.load_model` returns it.
        manifest: the source's manifest, as :func:`modellego.load_model` returns it.
        config: the task and the method.
        source_path: the source's file, recorded (with its SHA-256) in the provenance;
            ``layout`` union reads it back.
        data_dir: where the dataset's files are.
        command: the command line recorded in the provenance.
        dist: the data-parallel context under ``torchrun`` (only rank 0 fingerprints).
        reuse: see :func:`modellego.disassemble_model`.
        fingerprint: give the component its router fingerprint (made from its task's
            training images), which ``assemble --data-free`` routes with; it is kept with
            ``component.model`` and written by :func:`modellego.save_model`.

    Returns:
        ``(component, manifest, report)``.

    >>> model, manifest = load_model("checkpoints/digits/mobilenet_v2.safetensors")
    >>> comp, comp_manifest, report = disassemble(model, manifest, DisassemblyConfig((0, 1)))
    >>> comp_manifest.kind, comp_manifest.classes
    ('component', (0, 1))
    """
    manifest = as_manifest(manifest)
    require_single(manifest, "disassemble")
    # a streamed folder is read in a seeded pool per class: enough for the selection, the
    # validation top-up and the reconstruction's share of the class
    pool = STREAMED_POOL_FACTOR * config.samples_per_class + \
        (2 * int(config.validation_per_class or 0) if config.confident else 0) + \
        -(-config.fit_images // max(1, len(config.classes)))
    data = task_data(manifest, config.classes, data_dir=data_dir,
                     calibration=config.recalibrate_bn, streamed_pool=pool)
    own = list(manifest.classes)
    t0 = time.perf_counter()
    val_images, val_labels = split_images(manifest, "val", config.classes, data_dir=data_dir)
    with placed(model):  # on --device for the work (see modellego.runtime.device)
        comp = disassemble_model(model, data.images, data.labels, classes=config.classes,
                                 output_classes=own, config=config, val_images=val_images,
                                 val_labels=val_labels, calibration_images=data.calibration,
                                 dist=dist, reuse=reuse)
        seconds = time.perf_counter() - t0
        compared = component_report(model, comp.model, manifest, config.classes,
                                    data_dir=data_dir)
    comp.model.to(device_of(model))  # the component lives where its source does
    fitted = comp.reconstruction.to_dict() if comp.reconstruction is not None else None
    report = DisassemblyReport(
        **compared.fields(), profile_seconds=comp.profile.seconds, total_seconds=seconds,
        samples_per_class=comp.profile.samples,
        # a streamed folder: the samples were picked from a seeded pool
        selection_pool=data.pool,
        # too many classes for one profile within max_memory
        profile_chunks=comp.profile_chunks if comp.chunk_masks is not None else None,
        validation=comp.validation, reconstruction=fitted)
    repairs: dict[str, Any] = {}
    if comp.validation is not None:
        repairs["validation"] = comp.validation
    if fitted is not None:
        # the file records what was fitted, not how long it took (same inputs, same bytes)
        repairs["reconstruction"] = {k: v for k, v in fitted.items() if k != "seconds"}
    prov = provenance(
        "modellego disassemble", command, source=source_record(manifest, source_path),
        method=config.method, config=config.to_dict(), locate=comp.locate.to_dict(),
        threshold_search=list(comp.search),
        samples={str(c): data.split_positions(v) for c, v in comp.selection.indices.items()},
        kept_channels=comp.kept_channels(), **repairs)
    new_manifest = Manifest.for_component(
        manifest, comp.plan, dataset=data.info.to_dict(), classes=config.classes,
        metrics={"test_accuracy": report.component_accuracy}, provenance=prov,
        head=comp.head or None)
    if dist is None or dist.is_main:
        new_manifest = fingerprinted(comp.model, new_manifest, fingerprint, data_dir=data_dir)
    return comp, new_manifest, report


def component_report(source: nn.Module, component: nn.Module, manifest: Manifest,
                     classes: Sequence[int], *, data_dir: str | None = None) -> Comparison:
    """The fair comparison of a component with its source on the task's test images."""
    x, labels = split_images(manifest, "test", classes, data_dir=data_dir)
    own = list(manifest.classes)
    src_logits = predict_logits(source, x)
    comp_logits = predict_logits(component, x)
    src = accuracy_from_logits(src_logits, labels, own)
    restricted = accuracy_from_logits(src_logits, labels, own, restrict_to=classes)
    comp = accuracy_from_logits(comp_logits, labels, classes)
    shape = manifest.input.shape
    names = dict(zip(own, manifest.class_names))
    rows = [ClassRow(c, names[c], src.counts[c], src.per_class[c], restricted.per_class[c],
                     comp.per_class[c]) for c in classes]
    sp, cp = count_params(source), count_params(component)
    sf, cf = count_flops(source, shape), count_flops(component, shape)
    return Comparison(list(classes), src.n, src.accuracy, restricted.accuracy, comp.accuracy,
                      sp, cp, cp / sp, sf, cf, cf / sf, rows)
