"""Transformer benchmark: the default disassembly (no flags) of the shipped Fashion-MNIST
ViT on four tasks, what its components keep (attention heads and MLP neurons per block),
their measured CPU latency, and an assembly of the ViT's {0..4} component with the digits
VGG-16.

    .venv/bin/python benchmarks/transformers.py [--quick]

Goals (issue 30): component accuracy >= restricted source - 0.5 pp on every task, FLOPs
<= 50 % on tasks of <= 3 classes and <= 80 % on the others; the assembly >= Base - 0.5 pp;
the contribution profile <= 1.5 x a forward pass of the same images.
Prints tables and writes benchmarks/results/transformers.json. Every figure is measured in
this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from modellego import DisassemblyConfig, __version__, disassemble
from modellego.files import load_model, save_model
from modellego.metrics import count_flops, cpu_latency_ms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from assembly import run_case  # noqa: E402
from disassembly import profile_cost  # noqa: E402

VIT = ROOT / "checkpoints" / "fashion-mnist" / "vit.safetensors"
DIGITS_CNN = ROOT / "checkpoints" / "digits" / "vgg16_bn.safetensors"
TASKS = [(0, 1, 2), (1, 7), (0, 2, 4, 6, 8), (3, 4, 5, 6, 7, 8, 9)]


def flops_target(task: tuple[int, ...]) -> float:
    return 0.50 if len(task) <= 3 else 0.80


def kept_units(model: torch.nn.Module, plan: dict) -> list[dict]:
    """Per block: heads and MLP hidden neurons kept, of how many."""
    rows = []
    for i, block in enumerate(model.blocks):
        heads = plan.get(f"blocks.{i}.attn", {}).get("out")
        neurons = plan[f"blocks.{i}.mlp.0"]["out"]
        rows.append({"block": i, "heads": len(heads) if heads is not None else
                     block.attn.num_heads, "of_heads": block.attn.num_heads,
                     "neurons": len(neurons), "of_neurons": block.mlp[0].out_features})
    return rows


def paired_latency(a, b, shape, rounds: int = 5) -> tuple[float, float]:
    """The CPU latencies (ms) of ``a`` and ``b``, measured alternately ``rounds`` times
    (each a median of 30 passes), the best of each: the machine's speed drifts between
    runs, so a source timed once at the start is no reference for later components."""
    ta, tb = float("inf"), float("inf")
    for _ in range(rounds):
        ta = min(ta, cpu_latency_ms(a, shape))
        tb = min(tb, cpu_latency_ms(b, shape))
    return ta, tb


def component_rows(tasks: list[tuple[int, ...]], tmp: Path) -> tuple[list[dict], Path | None]:
    model, manifest = load_model(VIT)
    shape = manifest.input.shape
    rows, first_half = [], None
    for task in tasks:
        t0 = time.perf_counter()
        comp, man, record = disassemble(model, manifest, DisassemblyConfig(task),
                                        source_path=VIT, fingerprint=False)
        seconds = time.perf_counter() - t0
        rep = record.to_dict()
        units = kept_units(model, man.plan.to_dict())
        comp_ms, source_ms = paired_latency(comp.model, model, shape)
        row = {"task": list(task), "restricted_accuracy": rep["restricted_accuracy"],
               "component_accuracy": rep["component_accuracy"],
               "delta_pp": 100 * (rep["component_accuracy"] - rep["restricted_accuracy"]),
               "flops_ratio": rep["flops_ratio"], "params_ratio": rep["params_ratio"],
               "flops_target": flops_target(task), "seconds": seconds,
               "latency_ms": comp_ms, "source_latency_ms": source_ms,
               "heads_kept": sum(u["heads"] for u in units) / sum(u["of_heads"] for u in units),
               "neurons_kept": sum(u["neurons"] for u in units) /
               sum(u["of_neurons"] for u in units), "blocks": units}
        row["meets_accuracy"] = row["delta_pp"] >= -0.5
        row["meets_flops"] = row["flops_ratio"] <= row["flops_target"]
        rows.append(row)
        print(f"{str(list(task)):<22} restricted {row['restricted_accuracy']:.4f} component "
              f"{row['component_accuracy']:.4f} ({row['delta_pp']:+.2f} pp) FLOPs "
              f"{100 * row['flops_ratio']:.1f} % (goal {100 * row['flops_target']:.0f} %) "
              f"heads {100 * row['heads_kept']:.0f} % neurons {100 * row['neurons_kept']:.0f} % "
              f"latency {row['latency_ms']:.2f}/{source_ms:.2f} ms [{seconds:.0f} s]",
              flush=True)
        if task == (0, 1, 2, 3, 4):
            first_half = tmp / "vit-0-4.safetensors"
            save_model(first_half, comp.model, man)
    return rows, first_half


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two tasks, no assembly")
    args = parser.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    result: dict = {"modellego_version": __version__, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "machine": platform.machine(),
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                    "source": str(VIT.relative_to(ROOT))}
    model, manifest = load_model(VIT)
    result["source_flops"] = count_flops(model, manifest.input.shape)
    cost = profile_cost(rel="fashion-mnist/vit")
    result["profile_cost"] = {k: cost[k] for k in ("samples", "forward_seconds",
                                                   "profile_seconds", "profile_over_forward",
                                                   "threads", "timing")}
    print(f"profile pass {cost['profile_seconds']:.3f} s, forward {cost['forward_seconds']:.3f}"
          f" s on {cost['samples']} images: {cost['profile_over_forward']:.2f}x (goal 1.5x)",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = TASKS[:2] if args.quick else TASKS + [(0, 1, 2, 3, 4)]
        result["components"], half = component_rows(tasks, Path(tmp))
        if half is not None:
            case = run_case("vit+cnn", [half, DIGITS_CNN], 0, None, True, Path(tmp),
                            scalings=("joint",))
            case["goal"] = "balanced accuracy >= Base -0.5 pp"
            case["meets_goal"] = case["scalings"]["joint"]["delta_vs_base_pp"] >= -0.5
            case["parts"] = [str(VIT.relative_to(ROOT)) + " {0..4} (default component)",
                             str(DIGITS_CNN.relative_to(ROOT))]
            result["assembly"] = case
    result["seconds"] = time.perf_counter() - t0
    out = ROOT / "benchmarks" / "results" / ("transformers-quick.json" if args.quick
                                             else "transformers.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
