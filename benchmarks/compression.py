"""Compression benchmark: accuracy against FLOPs on all 10 classes, no fine-tuning, for the
contribution component of all classes (ours) and uniform L1 / FPGM channel pruning at equal
FLOPs, on the shipped Fashion-MNIST models.

    .venv/bin/python benchmarks/compression.py [--targets 0.9 0.8 ...] [--models ...]

For each target the contribution component is made first (``modellego compress FILE
--target-flops T``); L1 and FPGM are then pruned to the FLOPs ratio that component reached
(``--criterion l1 --target-flops R``), or to T where no contribution threshold reaches T.
Accuracy is on the test split. Sample selection (one forward pass over the training split)
is done once per model and its K samples per class are handed to every contribution run,
which selects the same samples again (tests/test_compress.py checks that the components are
identical). Prints a table and writes benchmarks/results/compression.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from modellego import __version__
from modellego.analysis.profile import select_samples
from modellego.compression import CompressConfig, compress_model
from modellego.data import load_split, normalize
from modellego.files import load_model
from modellego.metrics import accuracy_from_logits, count_flops, count_params, predict_logits
from modellego.workflows import sample_calibration_images

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["fashion-mnist/vgg16_bn", "fashion-mnist/resnet18"]
TARGETS = [0.95, 0.9, 0.8, 0.7, 0.6]
K = 50


def run_model(rel: str, targets: list[float], recalibrate: int = 0) -> tuple[dict, list[dict]]:
    path = ROOT / "checkpoints" / f"{rel}.safetensors"
    model, manifest = load_model(path)
    own = list(manifest["classes"])
    shape = tuple(manifest["input"]["shape"])
    dataset = manifest["dataset"]["name"]
    test = load_split(dataset, "test").subset(own)
    x_test = normalize(test.images, test.info)
    src_acc = accuracy_from_logits(predict_logits(model, x_test), test.labels, own).accuracy
    flops, params = count_flops(model, shape), count_params(model)
    t0 = time.perf_counter()
    train = load_split(dataset, "train").subset(own)
    x_train = normalize(train.images, train.info)
    idx = select_samples(model, x_train, train.labels, own, own, k=K).all_indices()
    x_sel, y_sel = x_train[idx], train.labels[idx]
    calib = sample_calibration_images(train, recalibrate) if recalibrate else None
    selection = time.perf_counter() - t0
    source = {"model": rel, "accuracy": src_acc, "flops": flops, "params": params,
              "test_images": len(test), "selection_seconds": selection}
    print(f"{rel}: source accuracy {src_acc:.4f}, {flops / 1e6:.1f} MFLOPs, {params:,} params;"
          f" selection {selection:.0f} s", flush=True)
    rows = []
    for target in targets:
        reached = target  # where ours fails, L1 and FPGM are pruned to the target itself
        runs = [(c, 0) for c in ("contribution", "l1", "fpgm")]
        runs += [(c, recalibrate) for c in ("contribution", "l1", "fpgm") if recalibrate]
        for criterion, recal in runs:
            goal = target if criterion == "contribution" else reached
            config = CompressConfig(criterion, target_flops=goal, samples_per_class=K,
                                    recalibrate_bn=recal)
            t0 = time.perf_counter()
            try:
                res = compress_model(model, shape, output_classes=own, config=config,
                                     images=x_sel, labels=y_sel,
                                     calibration_images=calib if recal else None)
            except Exception as exc:  # a criterion that cannot reach the target: say so
                rows.append({"model": rel, "target": target, "criterion": criterion,
                             "recalibrate_bn": recal, "target_flops": goal, "error": str(exc)})
                print(f"  target {target:.2f} {criterion:<12} failed: {exc}", flush=True)
                continue
            seconds = time.perf_counter() - t0
            acc = accuracy_from_logits(predict_logits(res.model, x_test), test.labels,
                                       own).accuracy
            row = {"model": rel, "target": target, "criterion": criterion,
                   "recalibrate_bn": recal, "target_flops": goal,
                   "flops_ratio": count_flops(res.model, shape) / flops,
                   "params_ratio": count_params(res.model) / params,
                   "accuracy": acc, "delta_pp": 100 * (acc - src_acc), "seconds": seconds,
                   "fraction": res.fraction,
                   "locate": res.locate.to_dict() if res.locate else None}
            if criterion == "contribution" and not recal:
                reached = row["flops_ratio"]
            rows.append(row)
            label = criterion + ("+bn" if recal else "")
            print(f"  target {target:.2f} {label:<16} FLOPs {100 * row['flops_ratio']:5.1f} %"
                  f" params {100 * row['params_ratio']:5.1f} %  accuracy {acc:.4f} "
                  f"({row['delta_pp']:+.2f} pp) [{seconds:.0f} s]", flush=True)
    return source, rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", nargs="*", type=float, default=TARGETS)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--recalibrate-bn", type=int, default=2000, metavar="N",
                        help="also run every criterion with BatchNorm re-estimation on N "
                             "training images (0: skip)")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / "compression.json"
    t0 = time.perf_counter()
    result = {"modellego_version": __version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "samples_per_class": K,
              "targets": args.targets, "sources": [], "rows": []}
    for rel in args.models:
        source, rows = run_model(rel, args.targets, args.recalibrate_bn)
        result["sources"].append(source)
        result["rows"] += rows
    result["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tables import compression

    print("\n".join(compression(result)))
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
