"""Rewrite the shipped checkpoints in today's format: each file gets the fingerprint of its
dataset (so that commands check the data against it instead of warning) and a router
fingerprint (so that it can be assembled with ``--data-free``); the files listed in
``HALF`` store their conv and linear weights in half precision (the loader converts them to
float32), which keeps the tracked tree small enough to copy to a GPU machine. Every other
tensor is unchanged. The test accuracy is measured again on the weights as they load and
written into the manifest, beside the float32 figure it replaces.

    .venv/bin/python scripts/rewrite-checkpoints.py

Idempotent: a file that already records its data fingerprint is left alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from modellego.assembly.fingerprint import fingerprint_model
from modellego.data import dataset_fingerprint, load_split, normalize
from modellego.files import load_model, save_model
from modellego.metrics import accuracy_from_logits, predict_logits

ROOT = Path(__file__).resolve().parent.parent
FILES = ["fashion-mnist/vgg16_bn", "fashion-mnist/resnet18", "fashion-mnist/vgg16_bn-classes0-4",
         "fashion-mnist/vgg16_bn-classes5-9", "digits/vgg16_bn", "digits/mobilenet_v2"]
#: the files whose conv and linear weights are stored in float16 (the three VGG-16s that only
#: the assembly benchmark and the demo read; the disassembly and compression benchmarks'
#: sources keep their float32 weights, so their results stand)
HALF = {"fashion-mnist/vgg16_bn-classes0-4", "fashion-mnist/vgg16_bn-classes5-9",
        "digits/vgg16_bn"}


def weights(model: nn.Module) -> list[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def rewrite(rel: str) -> None:
    path = ROOT / "checkpoints" / f"{rel}.safetensors"
    model, typed = load_model(path)
    manifest = typed.to_dict()  # rewritten as JSON data, validated again when saved
    dataset = manifest["dataset"]
    if dataset.get("fingerprint"):
        print(f"{rel}: already rewritten")
        return
    half = rel in HALF
    if half:  # the values the file will hold, as the loader gives them back
        for w in weights(model):
            w.copy_(w.half().float())
    test = load_split(dataset["name"], "test").subset(manifest["classes"])
    logits = predict_logits(model, normalize(test.images, test.info))
    acc = accuracy_from_logits(logits, test.labels, manifest["classes"])
    metrics = dict(manifest.get("metrics", {}))
    before = metrics.get("test_accuracy")
    metrics["test_accuracy"] = round(acc.accuracy, 4)
    metrics["test_per_class"] = {str(c): round(a, 3) for c, a in acc.per_class.items()}
    manifest = {**manifest, "metrics": metrics,
                "dataset": {**dataset, "fingerprint": dataset_fingerprint(dataset["name"])}}
    provenance = dict(manifest.get("provenance", {}))
    provenance["rewritten"] = {
        "by": "scripts/rewrite-checkpoints.py",
        "conv_linear_weights": "float16" if half else "float32",
        "test_accuracy_before": before}
    manifest["provenance"] = provenance
    manifest, fingerprint = fingerprint_model(model, manifest)
    if half:
        for w in weights(model):
            w.data = w.data.half()
    fd, tmp = tempfile.mkstemp(suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_model(tmp, model, manifest, fingerprint=fingerprint)
        again, _ = load_model(tmp)
        if not torch.equal(predict_logits(again, normalize(test.images, test.info)), logits):
            raise SystemExit(f"{rel}: the rewritten file gives other logits")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"{rel}: test accuracy {before} -> {metrics['test_accuracy']} "
          f"({'float16' if half else 'float32'} weights), {path.stat().st_size / 2**20:.1f} MiB")


def main() -> int:
    for rel in sys.argv[1:] or FILES:
        rewrite(rel)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
