"""``compress`` on a model file: data for the criterion, the smaller model, report, manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..assembly.fingerprint import fingerprinted
from ..compression import CompressConfig, compress_model, get_criterion
from ..data import dataset_info_for
from ..disassembly import kept_channels
from ..evaluation import check_dataset_matches
from ..manifest import Manifest, as_manifest
from ..provenance import provenance, require_single, source_record
from ..records import CompressionReport
from ..runtime.device import device_of, placed
from .common import STREAMED_POOL_FACTOR, split_images, task_data
from .disassembly import component_report


def compress(model: nn.Module, manifest: Manifest | Mapping[str, Any], config: CompressConfig,
             *,
             source_path: str | Path | None = None, data_dir: str | None = None,
             command: str | None = None, fingerprint: bool = True
             ) -> tuple[nn.Module, Manifest, CompressionReport]:
    """Compress a loaded model file; returns the smaller model, its manifest (kind
    ``component``, all the source's classes) and the report (test split, all classes).

    Args:
        model: the source network, as :func:`modellego.load_model` returns it.
        manifest: the source's manifest, as :func:`modellego.load_model` returns it.
        config: the compression target and method.
        source_path: as for :func:`modellego.disassemble`.
        data_dir: as for :func:`modellego.disassemble`.
        command: as for :func:`modellego.disassemble`.
        fingerprint: as for :func:`modellego.disassemble`.

    Returns:
        ``(model, manifest, report)``: the smaller network, its manifest and the report.

    ``source_path``, ``data_dir``, ``command`` and ``fingerprint`` as for
    :func:`modellego.disassemble`.

    >>> small, small_manifest, report = compress(model, manifest,
    ...                                          CompressConfig("l1", target_flops=0.5))
    """
    config.validate()
    manifest = as_manifest(manifest)
    require_single(manifest, "compress")
    dataset = manifest.own_dataset.name
    own = list(manifest.classes)
    t0 = time.perf_counter()
    info = dataset_info_for(manifest.own_dataset, data_dir=data_dir)
    check_dataset_matches(manifest, dataset, info)  # e.g. a folder whose images changed
    images = labels = val_images = val_labels = calibration = None
    needs_images = get_criterion(config.criterion).needs_training_images
    if needs_images or config.recalibrate_bn or config.reconstruct:
        data = task_data(manifest, own, data_dir=data_dir, calibration=config.recalibrate_bn,
                         what="compression", every_class=needs_images,
                         streamed_pool=max(STREAMED_POOL_FACTOR * config.samples_per_class,
                                           -(-config.reconstruct // len(own))))
        if needs_images or config.reconstruct:  # l1/fpgm need them to reconstruct only
            images, labels = data.images, data.labels
        calibration = data.calibration
    if config.max_accuracy_drop is not None:
        val_images, val_labels = split_images(manifest, "val", own, data_dir=data_dir)
    with placed(model):  # on --device for the work (see modellego.runtime.device)
        result = compress_model(model, manifest.input.shape, output_classes=own,
                                config=config, images=images, labels=labels,
                                val_images=val_images, val_labels=val_labels,
                                calibration_images=calibration)
        seconds = time.perf_counter() - t0
        compared = component_report(model, result.model, manifest, own, data_dir=data_dir)
    result.model.to(device_of(model))  # the smaller model lives where its source does
    report = CompressionReport(
        **compared.fields(), criterion=config.criterion, target_flops=config.target_flops,
        target_params=config.target_params, max_accuracy_drop=config.max_accuracy_drop,
        seconds=seconds, fraction=result.fraction,
        locate=result.locate.to_dict() if result.locate else None)
    fields: dict[str, Any] = {
        "source": source_record(manifest, source_path), "method": config.criterion,
        "config": config.to_dict(), "kept_channels": kept_channels(result.graph, result.plan)}
    if result.component is not None:
        comp = result.component
        fields.update({
            "disassembly": config.disassembly(own).to_dict(),
            "locate": comp.locate.to_dict(), "threshold_search": list(comp.search),
            "samples": {str(c): list(v) for c, v in comp.selection.indices.items()}})
    else:
        fields.update({"fraction": result.fraction, "bisection": list(result.trials)})
    new_manifest = Manifest.for_component(
        manifest, result.plan, dataset=info.to_dict(), classes=own,
        metrics={"test_accuracy": report.component_accuracy},
        provenance=provenance("modellego compress", command, **fields))
    new_manifest = fingerprinted(result.model, new_manifest, fingerprint, data_dir=data_dir)
    return result.model, new_manifest, report
