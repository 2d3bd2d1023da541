"""Compression benchmark: accuracy against FLOPs on all 10 classes, no fine-tuning, for the
contribution component of all classes (ours), uniform L1 / FPGM channel pruning (ours) and
Torch-Pruning's pruners (L1 / L2 magnitude, Taylor, LAMP; ``torch-pruning`` 1.6, the
``bench`` extra) at equal FLOPs, on the shipped Fashion-MNIST models.

    .venv/bin/python benchmarks/compression.py [--targets 0.9 0.8 ...] [--models ...]

For each target the contribution component is made first (``modellego compress FILE
--target-flops T``); the others are then pruned to the FLOPs ratio that component reached
(``--criterion l1 --target-flops R``), or to T where no contribution threshold reaches T.
Each of ours runs with every training-free repair (none, BN re-estimation, reconstruction
then BN re-estimation: ``--reconstruct 2000 --recalibrate-bn 2000``, compress's default
repairs; compress's default criterion is fpgm;
reconstruction fits on the selected samples and seeded other training images, 2000 in all);
Torch-Pruning's with BN
re-estimated the same way (its pruning ratio bisected to the FLOPs, every layer but the
logits prunable, LAMP global as published, the others per layer; Taylor's gradients from
the cross-entropy on the selected training images).
Accuracy is on the test split. Sample selection (one forward pass over the training split)
is done once per model and its K samples per class are handed to every contribution run,
which selects the same samples again (tests/test_compress.py checks that the components are
identical). Prints a table and writes benchmarks/results/compression.json.
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

from modellego import __version__
from modellego.analysis.profile import select_samples
from modellego.compression import (
    DEFAULT_RECALIBRATE_BN,
    DEFAULT_RECONSTRUCT,
    CompressConfig,
    compress_model,
)
from modellego.data import load_split, normalize
from modellego.files import load_model
from modellego.metrics import accuracy_from_logits, count_flops, count_params, predict_logits
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.recalibrate import recalibrate_batchnorm
from modellego.workflows import sample_calibration_images

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["fashion-mnist/vgg16_bn", "fashion-mnist/resnet18"]
TARGETS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.25]
K = 50
#: the repairs each of our criteria runs with: (name, --reconstruct, --recalibrate-bn);
#: "rec+bn" is compress's default repair
REPAIRS = [("none", 0, 0), ("bn", 0, DEFAULT_RECALIBRATE_BN),
           ("rec+bn", DEFAULT_RECONSTRUCT, DEFAULT_RECALIBRATE_BN)]
#: Torch-Pruning's importance criteria compared
PEERS = ["tp-l1", "tp-l2", "tp-taylor", "tp-lamp"]


def torch_pruning_peer(model, shape: tuple, name: str, target: float, x: torch.Tensor,
                       y: torch.Tensor, calib: torch.Tensor | None) -> torch.nn.Module:
    """``model`` pruned by Torch-Pruning with importance ``name`` to at most ``target`` of
    its FLOPs (the pruning ratio bisected), then its BN statistics re-estimated on
    ``calib``."""
    import torch.nn.functional as F
    import torch_pruning as tp

    source_flops = count_flops(model, shape)
    head = dict(model.named_modules())[build_channel_graph(model, shape).output_layer.name]
    head_index = [m for m in model.modules()].index(head)

    def prune(ratio: float) -> torch.nn.Module:
        net = copy.deepcopy(model).eval()
        ignored = [[m for m in net.modules()][head_index]]
        imp = {"tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
               "tp-l2": lambda: tp.importance.MagnitudeImportance(p=2),
               "tp-taylor": tp.importance.TaylorImportance,
               "tp-lamp": lambda: tp.importance.LAMPImportance(p=2)}[name]()
        pruner = tp.pruner.BasePruner(net, torch.zeros(1, *shape), importance=imp,
                                      pruning_ratio=ratio, ignored_layers=ignored,
                                      global_pruning=name == "tp-lamp")
        if name == "tp-taylor":
            net.zero_grad()
            for a in range(0, len(x), 250):
                F.cross_entropy(net(x[a:a + 250]), y[a:a + 250], reduction="sum").backward()
        pruner.step()
        net.zero_grad(set_to_none=True)
        return net.eval()

    lo, hi = 0.0, 0.99  # the ratio: lo keeps more than the target, hi reaches it
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        net = prune(mid)
        if count_flops(net, shape) / source_flops <= target:
            hi, best = mid, net
        else:
            lo = mid
    if best is None:
        best = prune(hi)
        if count_flops(best, shape) / source_flops > target:
            raise RuntimeError(f"{name}: ratio {hi} keeps more than {target:.3f} of the FLOPs")
    if calib is not None:
        recalibrate_batchnorm(best, calib)
    return best


def run_model(rel: str, targets: list[float], recalibrate: int = 0) -> tuple[dict, list[dict]]:
    path = ROOT / "checkpoints" / f"{rel}.safetensors"
    model, manifest = load_model(path)
    own = list(manifest.classes)
    shape = manifest.input.shape
    dataset = manifest.own_dataset.name
    test = load_split(dataset, "test").subset(own)
    x_test = normalize(test.images, test.info)
    src_acc = accuracy_from_logits(predict_logits(model, x_test), test.labels, own).accuracy
    flops, params = count_flops(model, shape), count_params(model)
    t0 = time.perf_counter()
    train = load_split(dataset, "train").subset(own)
    x_train = normalize(train.images, train.info)
    idx = select_samples(model, x_train, train.labels, own, own, k=K).all_indices()
    x_sel, y_sel = x_train[idx], train.labels[idx]
    # the images ours are handed: the selected samples (selection picks the same ones again:
    # the top-K of a superset) and seeded others, as many as reconstruction fits on
    rest = torch.ones(len(x_train), dtype=torch.bool)
    rest[idx] = False
    rest = rest.nonzero().flatten()
    more = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(1))[
        :max(0, DEFAULT_RECONSTRUCT - len(idx))]]
    x_fit, y_fit = torch.cat([x_sel, x_train[more]]), torch.cat([y_sel, train.labels[more]])
    calib = sample_calibration_images(train, recalibrate) if recalibrate else None
    selection = time.perf_counter() - t0
    source = {"model": rel, "accuracy": src_acc, "flops": flops, "params": params,
              "test_images": len(test), "selection_seconds": selection}
    print(f"{rel}: source accuracy {src_acc:.4f}, {flops / 1e6:.1f} MFLOPs, {params:,} params;"
          f" selection {selection:.0f} s", flush=True)
    rows = []
    for target in targets:
        reached = target  # where ours fails, the others are pruned to the target itself
        runs = [(c, r) for r in REPAIRS for c in ("contribution", "l1", "fpgm")
                if recalibrate or r[2] == 0]
        runs += [(p, ("bn", 0, recalibrate)) for p in PEERS if recalibrate]
        for criterion, (repair, rec, recal) in runs:
            goal = target if criterion == "contribution" else reached
            t0 = time.perf_counter()
            try:
                if criterion in PEERS:
                    net = torch_pruning_peer(model, shape, criterion, goal, x_sel, y_sel, calib)
                    fraction, locate = None, None
                else:
                    config = CompressConfig(criterion, target_flops=goal, samples_per_class=K,
                                            recalibrate_bn=recal, reconstruct=rec)
                    res = compress_model(model, shape, output_classes=own, config=config,
                                         images=x_fit, labels=y_fit,
                                         calibration_images=calib if recal else None)
                    net, fraction, locate = res.model, res.fraction, res.locate
            except Exception as exc:  # a criterion that cannot reach the target: say so
                rows.append({"model": rel, "target": target, "criterion": criterion,
                             "repair": repair, "recalibrate_bn": recal, "reconstruct": rec,
                             "target_flops": goal, "error": str(exc)})
                print(f"  target {target:.2f} {criterion:<12} {repair:<7} failed: {exc}",
                      flush=True)
                continue
            seconds = time.perf_counter() - t0
            acc = accuracy_from_logits(predict_logits(net, x_test), test.labels,
                                       own).accuracy
            row = {"model": rel, "target": target, "criterion": criterion, "repair": repair,
                   "recalibrate_bn": recal, "reconstruct": rec, "target_flops": goal,
                   "flops_ratio": count_flops(net, shape) / flops,
                   "params_ratio": count_params(net) / params,
                   "accuracy": acc, "delta_pp": 100 * (acc - src_acc), "seconds": seconds,
                   "fraction": fraction, "locate": locate.to_dict() if locate else None}
            if criterion == "contribution" and repair == "none":
                reached = row["flops_ratio"]
            rows.append(row)
            print(f"  target {target:.2f} {criterion:<12} {repair:<7} FLOPs "
                  f"{100 * row['flops_ratio']:5.1f} % params {100 * row['params_ratio']:5.1f} %"
                  f"  accuracy {acc:.4f} ({row['delta_pp']:+.2f} pp) [{seconds:.0f} s]",
                  flush=True)
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
