"""Assembly benchmark: training-free assembled classifiers against Base and a joint model.

    .venv/bin/python benchmarks/assembly.py [--quick] [--joint-epochs 2 (0: no joint models)]

Cases (shipped checkpoints; components made by `disassemble` with our settings):
  (a) vgg16_bn-classes0-4 + vgg16_bn-classes5-9 -> 10-class Fashion-MNIST
  (b) FM vgg16_bn + digits vgg16_bn -> 20 classes over both datasets
  (c) components: FM {0,1,2} + digits {7,8,9}; FM {3..9} + digits {0..4}; FM {0} + digits {0}
  (d) three parts: vgg16_bn-classes0-4 + vgg16_bn-classes5-9 + digits vgg16_bn
  (e) five parts, two architectures: FM vgg16_bn-classes0-4, FM resnet18 components {5,6,7}
      and {8,9}, digits vgg16_bn components {0..4} and {5..9}
Every part is given a router fingerprint first (as `modellego fingerprint` writes it), so
that scaling `fingerprint` (`assemble --data-free`) routes with no training image at all.
For every case and scaling: accuracy on the union of the parts' test sets (plain and balanced:
mean per class), Base (mean per-class accuracy of each part on its own classes), params,
FLOPs, routing (routing accuracy, the accuracy with perfect routing, routing AUROC per pair
of parts: see modellego.assembly.routing), and a model of the same architecture trained
jointly on the union for reference. Writes benchmarks/results/assembly.json
(assembly-routing.json with --joint-epochs 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from modellego import DisassemblyConfig, __version__, disassemble
from modellego.analysis.locate import LocateConfig
from modellego.assembly import AssemblyConfig, evaluate_assembly, union_test_set
from modellego.assembly.adapters import convert_images
from modellego.assembly.fingerprint import fingerprint_model
from modellego.data import load_split
from modellego.files import load_model, save_model
from modellego.manifest import Manifest
from modellego.metrics import count_flops, count_params, predict_logits
from modellego.models import create_model
from modellego.training import fit
from modellego.workflows import assemble

ROOT = Path(__file__).resolve().parent.parent
CK = ROOT / "checkpoints"
SCALINGS = ("none", "logit", "feature", "calibrated", "joint", "fingerprint")


def fingerprinted(tmp: Path, path: Path) -> Path:
    """A copy of a part file with its router fingerprint (from its own training images)."""
    out = tmp / f"fp-{path.parent.name}-{path.name}"
    if not out.exists():
        model, manifest = load_model(path)
        manifest, tensors = fingerprint_model(model, manifest)
        save_model(out, model, manifest, fingerprint=tensors)
    return out


def component(tmp: Path, rel: str, classes: tuple[int, ...]) -> Path:
    """A component made as this benchmark's cases have always been made (mass rule, its
    threshold searched against the observed validation accuracy, the plain cut;
    single-class components have no accuracy to search on, so a fixed threshold): the
    routing is what is measured here, on fixed parts."""
    src = CK / rel
    model, manifest = load_model(src)
    if len(classes) > 1:
        cfg = DisassemblyConfig.paper(classes, locate=LocateConfig(rule="mass"),
                                      max_accuracy_drop=0.2)
    else:
        cfg = DisassemblyConfig.paper(classes, locate=LocateConfig(rule="mass", beta_conv=0.05,
                                                                   beta_linear=0.05))
    comp, man, report = disassemble(model, manifest, cfg, source_path=src, fingerprint=False)
    rep = report.to_dict()
    out = tmp / f"{rel.replace('/', '_')}-{'-'.join(map(str, classes))}.safetensors"
    save_model(out, comp.model, man)
    print(f"  component {rel} {list(classes)}: accuracy {rep['component_accuracy']:.4f} "
          f"(restricted source {rep['restricted_accuracy']:.4f}), FLOPs "
          f"{100 * rep['flops_ratio']:.1f} %", flush=True)
    return out


def make_cases(tmp: Path, quick: bool, joint_a: dict | None = None,
               wanted: set[str] | None = None
               ) -> list[tuple[str, list[Path], dict | str | None]]:
    """The benchmark's cases: ``(name, part files, joint reference)``; components are made
    in ``tmp``. ``"reuse-b"``: case (b)'s jointly trained model serves (same label set).
    ``wanted``: only these cases (their components alone are made)."""
    fm, dg = CK / "fashion-mnist", CK / "digits"
    half0, half1 = fm / "vgg16_bn-classes0-4.safetensors", fm / "vgg16_bn-classes5-9.safetensors"
    fm_vgg, dg_vgg = "fashion-mnist/vgg16_bn.safetensors", "digits/vgg16_bn.safetensors"
    makers: list[tuple[str, Callable[[], list[Path]], dict | str | None]] = [
        ("a", lambda: [half0, half1], joint_a),
        ("b", lambda: [fm / "vgg16_bn.safetensors", dg / "vgg16_bn.safetensors"], None),
        ("c1", lambda: [component(tmp, fm_vgg, (0, 1, 2)), component(tmp, dg_vgg, (7, 8, 9))],
         None),
        ("c2", lambda: [component(tmp, fm_vgg, (3, 4, 5, 6, 7, 8, 9)),
                        component(tmp, dg_vgg, (0, 1, 2, 3, 4))], None),
        ("c3", lambda: [component(tmp, fm_vgg, (0,)), component(tmp, dg_vgg, (0,))], None),
        ("d", lambda: [half0, half1, dg / "vgg16_bn.safetensors"], "reuse-b"),
        # five parts, two architectures: FM 0-4 (the VGG-16 half), FM 5-7 and 8-9
        # (components of the shipped ResNet-18), digits 0-4 and 5-9 (components of the
        # digits VGG-16)
        ("e", lambda: [half0,
                       component(tmp, "fashion-mnist/resnet18.safetensors", (5, 6, 7)),
                       component(tmp, "fashion-mnist/resnet18.safetensors", (8, 9)),
                       component(tmp, dg_vgg, (0, 1, 2, 3, 4)),
                       component(tmp, dg_vgg, (5, 6, 7, 8, 9))], "reuse-b"),
    ]
    if quick:
        wanted = {"a", "c1"}
    return [(name, make(), joint) for name, make, joint in makers
            if wanted is None or name in wanted]


def joint_reference(manifest: Manifest, arch_of: Path, epochs: int) -> dict:
    """The parts' architecture trained on the union of their training data (labels = the
    assembled outputs), evaluated on the same union test set."""
    _, src_manifest = load_model(arch_of)
    kwargs = dict(src_manifest.own_architecture.kwargs or {})
    contract = manifest.input.shape
    assert manifest.assembly is not None
    labels = manifest.assembly.labels
    kwargs.update(in_channels=contract[0], input_size=contract[1], num_classes=len(labels))
    xs = {"train": [], "val": []}
    ys = {"train": [], "val": []}
    for split in ("train", "val"):
        for idx, lab in enumerate(labels):
            data = load_split(lab.dataset, split)
            sel = data.labels == lab.class_id
            xs[split].append(convert_images(data.images[sel], contract[0], contract[1:]))
            ys[split].append(torch.full((int(sel.sum()),), idx, dtype=torch.long))
    x_train, y_train = torch.cat(xs["train"]), torch.cat(ys["train"])
    mean, std = x_train.mean(), x_train.std()
    x_val, y_val = torch.cat(xs["val"]), torch.cat(ys["val"])
    torch.manual_seed(0)
    model = create_model(src_manifest.own_architecture.name, **kwargs)
    t0 = time.perf_counter()
    fit(model, (x_train - mean) / std, y_train, (x_val - mean) / std, y_val,
        list(range(len(labels))), epochs=epochs, pad=2, progress=False)
    seconds = time.perf_counter() - t0
    x, y = union_test_set(manifest)
    pred = predict_logits(model, (x - mean) / std).argmax(1)
    correct = pred == y
    per = [float(correct[y == i].double().mean()) for i in range(len(labels))]
    return {"architecture": src_manifest.own_architecture.name, "epochs": epochs,
            "accuracy": float(correct.double().mean()), "balanced_accuracy": sum(per) / len(per),
            "params": count_params(model), "flops": count_flops(model, contract),
            "train_seconds": seconds}


def run_case(name: str, parts: list[Path], joint_epochs: int, joint: dict | None,
             quick: bool, tmp: Path, scalings: tuple[str, ...] = SCALINGS) -> dict:
    print(f"== case {name}: " + " + ".join(p.name for p in parts), flush=True)
    case: dict = {"case": name, "parts": [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT)
                                          else p.name for p in parts], "scalings": {}}
    nets = [load_model(p) for p in parts]
    case["parts_flops"] = sum(count_flops(n, tuple(m["input"]["shape"])) for n, m in nets)
    parts = [fingerprinted(tmp, p) for p in parts]
    manifest = None
    for scaling in scalings:
        t0 = time.perf_counter()
        model, manifest, _ = assemble(parts, AssemblyConfig(scaling=scaling), evaluate=False)
        fit_seconds = time.perf_counter() - t0
        ev = evaluate_assembly(model, manifest).to_dict()
        row = {"accuracy": ev["accuracy"], "balanced_accuracy": ev["balanced_accuracy"],
               "delta_vs_base_pp": 100 * (ev["balanced_accuracy"] - ev["base"]),
               "params": ev["params"], "flops": ev["flops"], "assemble_seconds": fit_seconds,
               "per_class": ev["per_class"], "routing": ev["routing"]}
        calibration = manifest.to_dict()["provenance"]["calibration"]
        if "router_fit_accuracy" in calibration:
            row["router_fit_accuracy"] = calibration["router_fit_accuracy"]
        if "router_weights" in calibration:
            row["router_weights"] = calibration["router_weights"]
            row["fit_images"] = calibration["fit_images"]
        case["base"] = ev["base"]
        case["n_test"] = ev["n"]
        case["scalings"][scaling] = row
        print(f"  {scaling:<10} accuracy {ev['accuracy']:.4f} balanced "
              f"{ev['balanced_accuracy']:.4f} Base {ev['base']:.4f} "
              f"({row['delta_vs_base_pp']:+.2f} pp); routing accuracy "
              f"{ev['routing']['routing_accuracy']:.4f}, perfect routing "
              f"{ev['routing']['oracle_balanced_accuracy']:.4f}", flush=True)
    best = max(case["scalings"], key=lambda s: case["scalings"][s]["balanced_accuracy"])
    case["best_scaling"] = best
    default = case["scalings"]["joint"]
    if name == "a":  # the jointly trained 10-class model - 1 pp (issue #14)
        case["goal"] = "balanced accuracy >= 0.9223"
        case["meets_goal"] = default["balanced_accuracy"] >= 0.9223
    else:
        limit = -2.0 if name in ("d", "e") else -0.5
        case["goal"] = f"balanced accuracy >= Base {limit:+.1f} pp"
        case["meets_goal"] = default["delta_vs_base_pp"] >= limit
    if name not in ("a", "d", "e") and "fingerprint" in case["scalings"]:
        # data-free across datasets: within 1 pp of Base
        case["data_free_meets_goal"] = \
            case["scalings"]["fingerprint"]["delta_vs_base_pp"] >= -1
    if joint is not None:
        case["joint"] = joint
    elif not quick and joint_epochs > 0:
        case["joint"] = joint_reference(manifest, parts[0], joint_epochs)
    if "joint" in case:
        print(f"  joint model ({case['joint']['epochs']} epochs): accuracy "
              f"{case['joint']['accuracy']:.4f} balanced "
              f"{case['joint']['balanced_accuracy']:.4f}", flush=True)
    return case


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="cases a and c1, no joint models")
    parser.add_argument("--joint-epochs", type=int, default=2,
                        help="0: no jointly trained reference models (writes "
                             "assembly-routing.json)")
    parser.add_argument("--cases", default=None, metavar="a,d,e",
                        help="only these cases (writes assembly-subset.json)")
    parser.add_argument("--scalings", default=None, metavar="joint,fingerprint",
                        help=f"only these scalings of {', '.join(SCALINGS)} (writes "
                             "assembly-subset.json; must include joint, the default)")
    args = parser.parse_args()
    wanted = set(args.cases.split(",")) if args.cases else None
    scalings = tuple(args.scalings.split(",")) if args.scalings else SCALINGS
    if "joint" not in scalings or not set(scalings) <= set(SCALINGS):
        parser.error(f"--scalings: joint and any of {', '.join(SCALINGS)}")
    subset = wanted is not None or scalings != SCALINGS
    t0 = time.perf_counter()
    result = {"modellego_version": __version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "cases": []}
    fm = CK / "fashion-mnist"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fm_full, _ = load_model(fm / "vgg16_bn.safetensors")
        full_manifest = load_model(fm / "vgg16_bn.safetensors")[1].to_dict()
        joint_a = {"architecture": "vgg16_bn", "epochs": full_manifest["provenance"]["config"][
            "epochs"], "accuracy": full_manifest["metrics"]["test_accuracy"],
            "balanced_accuracy": full_manifest["metrics"]["test_accuracy"],
            "params": count_params(fm_full), "flops": count_flops(fm_full, (1, 28, 28)),
            "note": "the shipped 10-class model (test set is balanced)"}
        cases = make_cases(tmp, args.quick, joint_a, wanted)
        joint_b = None
        for name, parts, joint in cases:
            if joint == "reuse-b":
                joint = joint_b
            case = run_case(name, parts, args.joint_epochs, joint, args.quick, tmp, scalings)
            if name == "b":
                joint_b = case.get("joint")
            result["cases"].append(case)
    # padded == parallel, measured on case (a)
    a_parts = [fm / "vgg16_bn-classes0-4.safetensors", fm / "vgg16_bn-classes5-9.safetensors"]
    par, man, _ = assemble(a_parts, AssemblyConfig(layout="parallel", scaling="logit"))
    pad, _, _ = assemble(a_parts, AssemblyConfig(layout="padded", scaling="logit"))
    x, _ = union_test_set(man)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:500]]
    diff = float((predict_logits(par, x) - predict_logits(pad, x)).abs().max())
    result["padded_vs_parallel"] = {"max_abs_logit_diff": diff,
                                    "parallel_flops": count_flops(par, (1, 28, 28)),
                                    "padded_flops": count_flops(pad, (1, 28, 28))}
    print(f"padded vs parallel on (a): max |logit diff| {diff:.2e}; FLOPs parallel "
          f"{result['padded_vs_parallel']['parallel_flops']:,} padded "
          f"{result['padded_vs_parallel']['padded_flops']:,}")
    result["seconds"] = time.perf_counter() - t0
    result["scalings"] = list(scalings)
    out = ROOT / "benchmarks" / "results" / (
        "assembly-subset.json" if subset else "assembly-quick.json" if args.quick
        else "assembly-routing.json" if args.joint_epochs == 0 else "assembly.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
