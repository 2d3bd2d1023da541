"""Distillation benchmark: a small student trained with a component (or model) as teacher,
against the same student trained alone with the same seed.

    .venv/bin/python benchmarks/distillation.py [--epochs 3] [--full]

The teacher is the {0,1,2} component of the shipped Fashion-MNIST VGG-16, cut in this run
(contribution-mass rule, thresholds searched for at most 0.2 pp validation loss); ``--full``
adds the whole 10-class VGG-16 as a second teacher (about three times the teacher cost).
Prints a table and writes benchmarks/results/distillation.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from modellego import DisassemblyConfig, __version__, disassemble
from modellego.analysis.locate import LocateConfig
from modellego.distillation import DistillConfig, distill, format_distill
from modellego.files import load_model

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "checkpoints" / "fashion-mnist" / "vgg16_bn.safetensors"
TASK = (0, 1, 2)


def run(name: str, teacher, manifest: dict, config: DistillConfig, extra: dict,
        source_path: Path | None = None) -> dict:
    record = distill(teacher, manifest, config, source_path=source_path)[2]
    report = record.to_dict()
    if source_path is not None:
        report["teacher"]["file"] = str(source_path.relative_to(ROOT))
    print(f"== {name}\n{format_distill(record)}", flush=True)
    return {"teacher_name": name, **extra, **report}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--student", default="simnet")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--full", action="store_true",
                        help="also distil the whole 10-class model (slow)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    config = DistillConfig(args.student, width=args.width, epochs=args.epochs)
    source, manifest = load_model(SOURCE)
    # the component of the distillation table (the previous release's search, plain cut)
    cut = DisassemblyConfig.paper(TASK, locate=LocateConfig(rule="mass"),
                                  max_accuracy_drop=0.2)
    t1 = time.perf_counter()
    comp, comp_manifest, comp_report = disassemble(source, manifest, cut, source_path=SOURCE,
                                                   fingerprint=False)
    seconds = time.perf_counter() - t1
    print(f"component {list(TASK)}: test accuracy {comp_report.component_accuracy:.4f}, "
          f"FLOPs {100 * comp_report.flops_ratio:.1f} % of the source "
          f"[{seconds:.0f} s]", flush=True)
    rows = [run("fashion-mnist/vgg16_bn component {0,1,2}", comp.model, comp_manifest, config,
                {"disassembly": cut.to_dict(), "disassembly_seconds": seconds})]
    if args.full:
        rows.append(run("fashion-mnist/vgg16_bn", source, manifest, config, {}, SOURCE))
    result = {"modellego_version": __version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "rows": rows,
              "seconds": time.perf_counter() - t0}
    out = ROOT / "benchmarks" / "results" / "distillation.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)} [{result['seconds']:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
