"""Reconstruction benchmark: the plain cut against closed-form reconstruction (and each with
BatchNorm re-estimation) on the shipped Fashion-MNIST models, at mass-rule thresholds that
keep from about 60 % down to about 30 % of the FLOPs.

    .venv/bin/python benchmarks/reconstruct.py [--quick]

Every component of a (model, task) shares one sample selection and profile; each setting is
cut once by ``disassemble_model`` without and once with ``reconstruct`` (1,500 seeded
training images of the task), and BatchNorm statistics are re-estimated on 2,000 training
images of all classes for the two "+ BN" columns. Accuracies are on the task's test images,
against the source restricted to the task's classes. Every figure is measured in this run;
writes benchmarks/results/reconstruct.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from modellego import DisassemblyConfig, __version__, disassemble_model
from modellego.analysis.locate import LocateConfig
from modellego.data import load_split, normalize
from modellego.files import load_model
from modellego.metrics import accuracy_from_logits, count_flops, predict_logits
from modellego.surgery.recalibrate import recalibrate_batchnorm
from modellego.workflows import sample_calibration_images

ROOT = Path(__file__).resolve().parent.parent
#: (model, task, mass-rule betas): thresholds that keep about 60 / 45 / 30 % of the FLOPs
SETTINGS = [
    ("fashion-mnist/vgg16_bn", (0, 1, 2), (0.2, 0.3, 0.4)),
    ("fashion-mnist/resnet18", (0, 1, 2), (0.3, 0.4, 0.5)),
    ("fashion-mnist/vgg16_bn", tuple(range(10)), (0.5, 0.7)),
]
FIT_IMAGES = 1500
BN_IMAGES = 2000


def rows_for(rel: str, task: tuple[int, ...], betas: tuple[float, ...],
             calib: torch.Tensor) -> list[dict]:
    model, _ = load_model(ROOT / "checkpoints" / f"{rel}.safetensors")
    train = load_split("fashion-mnist", "train").subset(task)
    x, y = normalize(train.images, train.info), train.labels
    test = load_split("fashion-mnist", "test").subset(task)
    xt = normalize(test.images, test.info)
    own = list(range(10))
    restricted = accuracy_from_logits(predict_logits(model, xt), test.labels, own,
                                      restrict_to=task).accuracy
    shape = tuple(x.shape[1:])
    source_flops = count_flops(model, shape)

    def accuracy(net: torch.nn.Module) -> float:
        return accuracy_from_logits(predict_logits(net, xt), test.labels, task).accuracy

    first = None
    rows = []
    for beta in betas:
        locate = LocateConfig(rule="mass", beta_conv=beta, beta_linear=beta)
        plain = disassemble_model(model, x, y, classes=task, output_classes=own,
                                  config=DisassemblyConfig(task, locate=locate, reconstruct=0),
                                  reuse=first)
        first = first or plain
        t0 = time.perf_counter()
        fixed = disassemble_model(model, x, y, classes=task, output_classes=own,
                                  config=DisassemblyConfig(task, locate=locate,
                                                           reconstruct=FIT_IMAGES),
                                  reuse=first)
        seconds = time.perf_counter() - t0
        fit = fixed.reconstruction
        assert fit is not None and fixed.plan == plain.plan
        row = {"model": rel, "task": list(task), "beta": beta,
               "flops_ratio": count_flops(plain.model, shape) / source_flops,
               "restricted_accuracy": restricted}
        for key, net in (("plain", plain.model), ("reconstructed", fixed.model)):
            row[f"{key}_accuracy"] = accuracy(net)
            recal = copy.deepcopy(net)
            recalibrate_batchnorm(recal, calib)
            row[f"{key}_bn_accuracy"] = accuracy(recal)
        for key in ("plain", "plain_bn", "reconstructed", "reconstructed_bn"):
            row[f"{key}_delta_pp"] = 100 * (row[f"{key}_accuracy"] - restricted)
        row.update({"fit_images": fit.images, "layers_refitted": len(fit.layers),
                    "layers_skipped": dict(fit.skipped), "repair_seconds": fit.seconds,
                    "disassembly_with_repair_seconds": seconds,
                    "max_rows": max(f.rows for f in fit.layers),
                    "max_features": max(f.features for f in fit.layers)})
        rows.append(row)
        print(f"{rel:<24} {len(task):>2} classes beta {beta:<4} FLOPs "
              f"{100 * row['flops_ratio']:5.1f} %  plain {row['plain_delta_pp']:+7.2f}  "
              f"+BN {row['plain_bn_delta_pp']:+7.2f}  reconstructed "
              f"{row['reconstructed_delta_pp']:+6.2f}  +BN {row['reconstructed_bn_delta_pp']:+6.2f}"
              f" pp  (restricted {restricted:.4f}; repair {fit.seconds:.0f} s)", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the first setting only")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / ("reconstruct-quick.json" if args.quick
                                             else "reconstruct.json")
    t0 = time.perf_counter()
    result: dict = {"modellego_version": __version__, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "machine": platform.machine(),
                    "date": time.strftime("%Y-%m-%d"), "fit_images": FIT_IMAGES,
                    "bn_images": BN_IMAGES, "rows": []}
    calib = sample_calibration_images(load_split("fashion-mnist", "train"), BN_IMAGES)
    settings = SETTINGS[:1] if args.quick else SETTINGS
    for rel, task, betas in settings:
        result["rows"] += rows_for(rel, task, betas[:1] if args.quick else betas, calib)
    result["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
