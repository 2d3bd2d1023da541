"""Does the default's accuracy bound hold? The default disassembly keeps the smallest
component whose one-sided 90 % upper confidence bound of its paired accuracy drop against
the restricted source, on the validation images, is within 0.5 pp. This benchmark runs the
default (no flags) on seeded random tasks of the shipped models and measures, on the test
split that the search never reads, how often the component's drop is within the budget.

    .venv/bin/python benchmarks/bound.py [--draws 12] [--models fashion-mnist/resnet18 ...]

A task draw: a seeded number of classes (1 to 5) and a seeded choice of them. For each draw
the JSON (benchmarks/results/bound.json) records the validation figures the search judged
on (drop, bound, images) and the test figures (restricted source and component accuracy,
their paired drop, and that drop's own one-sided 90 % lower bound: a drop whose lower bound
is above the budget exceeds it beyond the test split's noise).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from modellego import DisassemblyConfig, __version__, disassemble
from modellego.analysis.search import PairedDrop
from modellego.disassembly import DEFAULT_BUDGET, DEFAULT_CONFIDENCE
from modellego.files import load_model
from modellego.metrics import predict_logits
from modellego.workflows.common import split_images

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["fashion-mnist/resnet18", "digits/mobilenet_v2"]


def draws(n: int, num_classes: int, seed: int) -> list[tuple[int, ...]]:
    """``n`` seeded tasks: 1 to 5 classes each, in increasing order."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 6, (1,), generator=gen))
        out.append(tuple(sorted(torch.randperm(num_classes, generator=gen)[:k].tolist())))
    return out


def test_drop(source, component, manifest, task) -> dict:
    """The paired drop of ``component`` against the source restricted to ``task`` on the
    task's test images, in points, with its one-sided lower bound at the default's
    confidence."""
    x, labels = split_images(manifest, "test", task)
    own = torch.tensor(manifest.classes)
    cols = torch.tensor([manifest.classes.index(c) for c in task])
    src = own[cols][predict_logits(source, x)[:, cols].argmax(1)] == labels
    comp = torch.tensor(task)[predict_logits(component, x).argmax(1)] == labels
    drop = PairedDrop.of(src, comp)
    lost, gained = drop.lost, drop.gained
    # the lower bound: the drop less the bound's margin above it
    margin = drop.upper(DEFAULT_CONFIDENCE) - drop.drop
    return {"images": len(labels), "lost": lost, "gained": gained,
            "source_accuracy": float(src.double().mean()),
            "component_accuracy": float(comp.double().mean()),
            "drop_pp": 100 * drop.drop, "lower_bound_pp": 100 * (drop.drop - margin)}


def run(model_name: str, n: int, seed: int) -> dict:
    path = ROOT / "checkpoints" / f"{model_name}.safetensors"
    model, manifest = load_model(path)
    rows = []
    for task in draws(n, len(manifest.classes), seed):
        t0 = time.perf_counter()
        comp, _, record = disassemble(model, manifest, DisassemblyConfig(task),
                                      source_path=path, fingerprint=False)
        seconds = time.perf_counter() - t0
        report = record.to_dict()
        validation = report.get("validation") or {}
        row = {"task": list(task), "seconds": seconds, "flops_ratio": report["flops_ratio"],
               "validation": {k: validation.get(k) for k in
                              ("images", "chosen_accuracy", "chosen_passes", "chosen")},
               "test": test_drop(model, comp.model, manifest, task)}
        row["within_budget"] = row["test"]["drop_pp"] <= DEFAULT_BUDGET
        row["beyond_noise"] = row["test"]["lower_bound_pp"] > DEFAULT_BUDGET
        rows.append(row)
        print(f"  {model_name} {task}: FLOPs {100 * row['flops_ratio']:.1f} %, test drop "
              f"{row['test']['drop_pp']:+.2f} pp (lower bound "
              f"{row['test']['lower_bound_pp']:+.2f}) on {row['test']['images']} images, "
              f"{seconds:.0f} s", flush=True)
    held = sum(r["within_budget"] for r in rows)
    beyond = sum(r["beyond_noise"] for r in rows)
    print(f"{model_name}: test drop within {DEFAULT_BUDGET} pp on {held} of {len(rows)} "
          f"draws; beyond the test split's noise on {beyond}", flush=True)
    return {"model": model_name, "draws": rows, "within_budget": held,
            "beyond_noise": beyond}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=12)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    results = [run(m, args.draws, args.seed) for m in args.models]
    out = {"date": time.strftime("%Y-%m-%d"), "modellego": __version__,
           "torch": torch.__version__, "machine": platform.machine(),
           "threads": torch.get_num_threads(), "budget_pp": DEFAULT_BUDGET,
           "confidence": DEFAULT_CONFIDENCE, "seed": args.seed,
           "seconds": time.perf_counter() - t0, "models": results}
    path = ROOT / "benchmarks" / "results" / "bound.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
