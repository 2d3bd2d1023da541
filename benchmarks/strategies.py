"""Strategies benchmark: the disassembly methods side by side, with a Pan & Rajan-style baseline.

    .venv/bin/python benchmarks/strategies.py [--models fashion-mnist/vgg16_bn ...]

On the shipped Fashion-MNIST checkpoints and the tasks of benchmarks/disassembly.py, each
strategy is scored on the task's test images against the source restricted to the task's
classes, with its params and FLOPs as a share of the source and its wall time. Prints a
table and writes benchmarks/results/strategies.json (rows of the models run replace theirs).

Strategies:

- ``contribution``: ``--method contribution`` with the public code's defaults (count rule);
- ``ours``: ``--method contribution --rule mass --max-accuracy-drop 0.2`` (validation search);
- ``contribution-2022``: ``--method contribution-2022`` (correctly classified samples only,
  normalised by the max; the public code's thresholds);
- ``frat``: ``--method frat`` (its default thresholds, 0.2);
- ``pan-rajan``: Pan & Rajan's modules (ICSE'22), training-free, from the library
  (``--method pan-rajan``, see ``modellego.analysis.activity``). For each class ``c`` of
  the task, the one-class module is disassembled on ``c``'s selected training samples (the
  same K = 50 most confident ones the other strategies profile): a channel is *never
  active* for ``c`` when, at every conv/linear layer that reads it, its largest activation
  over those samples and all positions is at most 1 % of the largest activation of any
  channel of that layer's input (the image is never touched); never-active channels are
  removed (a physically smaller network, equal to the source with them zeroed). Its
  one-vs-rest head is ``score_c(x) = logit_c(x) - logsumexp_{j != c} logit_j(x)`` over the
  module's own logits (positive: "x is a c"). The task's prediction is the class whose
  module scores highest (the assembly scaling ``concern``); its cost is the sum of the
  modules' params and FLOPs.

Timing: every strategy selects the same samples except ``contribution-2022`` (correctly
classified only). The selection pass (one forward pass over the task's training images) runs
once per task and its time is added to every strategy's own time; when every selected
sample's true-class probability exceeds 0.5 (so it is the top class), the correctly
classified selection is the same and is reused. Every other figure is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from modellego import __version__
from modellego.analysis.locate import LocateConfig, profiled_layers
from modellego.analysis.methods import get_method
from modellego.analysis.profile import SampleSelection, select_samples
from modellego.data import load_split, normalize
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.files import load_model
from modellego.metrics import accuracy_from_logits, count_flops, count_params, predict_logits
from modellego.surgery.graph import ChannelGraph, build_channel_graph

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["fashion-mnist/vgg16_bn", "fashion-mnist/resnet18"]
TASKS = [(0, 1, 2), (3, 4, 5, 6, 7, 8, 9), (0, 2, 4, 6, 8), (1, 7)]
STRATEGIES = {
    "contribution": {},
    "ours": {"locate": LocateConfig(rule="mass"), "max_accuracy_drop": 0.2},
    "contribution-2022": {"method": "contribution-2022"},
    "frat": {"method": "frat"},
}
K = 50
#: Pan & Rajan: a channel is never active below this share of its layer input's max
INACTIVE = 0.01


def pan_rajan(model: nn.Module, graph: ChannelGraph, x: torch.Tensor, y: torch.Tensor,
              selection: SampleSelection, task: tuple[int, ...], own: list[int]
              ) -> tuple[list[nn.Module], list[float]]:
    """One library module per class of ``task``; also the share of channels each removes
    (over the spaces a conv/linear layer reads)."""
    method = get_method("pan-rajan")
    read = {seg.space for lay in profiled_layers(graph) for seg in lay.in_layout}
    total = sum(graph.space_size[s] for s in read)
    modules, zeroed = [], []
    for c in task:
        cfg = DisassemblyConfig((c,), samples_per_class=K, method="pan-rajan",
                                locate=LocateConfig(alpha_conv=INACTIVE,
                                                    alpha_linear=INACTIVE))
        comp = disassemble_model(model, x, y, classes=(c,), output_classes=own, config=cfg,
                                 selection=selection, graph=graph)
        masks = method.locate(graph, comp.profile, (c,), own, comp.locate)
        modules.append(comp.model)
        zeroed.append(sum(int((~masks[s]).sum()) for s in read) / total)
    return modules, zeroed


def pan_rajan_predict(modules: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Scores ``(N, len(task))`` of the concern heads, and how often none or several claim x."""
    s = torch.cat([predict_logits(module, x).double() for module in modules], 1)
    claims = (s > 0).sum(1)
    return s, {"no_module_claims": float((claims == 0).float().mean()),
               "several_claim": float((claims > 1).float().mean())}


def correct_selection(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task, own,
                      selection: SampleSelection) -> tuple[SampleSelection, float, bool]:
    """The correctly-classified-only selection; reused from ``selection`` when provably equal."""
    if all(p > 0.5 for c in task for p in selection.scores[c]):
        return replace(selection, correct_only=True), 0.0, True
    t0 = time.perf_counter()
    sel = select_samples(model, x, y, task, own, k=K, correct_only=True)
    return sel, time.perf_counter() - t0, False


def run_model(rel: str, tasks: list[tuple[int, ...]]) -> list[dict]:
    path = ROOT / "checkpoints" / f"{rel}.safetensors"
    model, manifest = load_model(path)
    own = list(manifest.classes)
    splits = {name: load_split(manifest.own_dataset.name, name)
              for name in ("train", "val", "test")}
    shape = manifest.input.shape
    graph = build_channel_graph(model, shape)
    src_params, src_flops = count_params(model), count_flops(model, shape)
    rows = []
    for task in tasks:
        data = {}
        for name, split in splits.items():
            sub = split.subset(task)
            data[name] = (normalize(sub.images, sub.info), sub.labels)
        x, y = data["train"]
        xt, yt = data["test"]
        src_logits = predict_logits(model, xt)
        restricted = accuracy_from_logits(src_logits, yt, own, restrict_to=task).accuracy
        t0 = time.perf_counter()
        selection = select_samples(model, x, y, task, own, k=K)
        select_seconds = time.perf_counter() - t0
        sel22, extra, reused = correct_selection(model, x, y, task, own, selection)
        base = {"model": rel, "task": list(task), "restricted_accuracy": restricted,
                "selection_seconds": select_seconds}
        for name, options in STRATEGIES.items():
            cfg = DisassemblyConfig(task, samples_per_class=K, preset="paper", **options)
            sel = sel22 if cfg.method == "contribution-2022" else selection
            t0 = time.perf_counter()
            comp = disassemble_model(model, x, y, classes=task, output_classes=own, config=cfg,
                                     val_images=data["val"][0], val_labels=data["val"][1],
                                     selection=sel)
            own_seconds = time.perf_counter() - t0
            if cfg.method == "contribution-2022":
                own_seconds += extra
            acc = accuracy_from_logits(predict_logits(comp.model, xt), yt, task).accuracy
            row = {**base, "strategy": name, "accuracy": acc,
                   "params_ratio": count_params(comp.model) / src_params,
                   "flops_ratio": count_flops(comp.model, shape) / src_flops,
                   "own_seconds": own_seconds, "seconds": select_seconds + own_seconds,
                   "locate": comp.locate.to_dict(), "method": cfg.method,
                   "samples": {str(c): len(v) for c, v in comp.selection.indices.items()}}
            if cfg.method == "contribution-2022":
                row["selection_reused"] = reused
            rows.append(_report(row))
        t0 = time.perf_counter()
        modules, zeroed = pan_rajan(model, graph, x, y, selection, task, own)
        own_seconds = time.perf_counter() - t0
        scores, claims = pan_rajan_predict(modules, xt)
        pred = torch.tensor(task)[scores.argmax(1)]
        acc = float((pred == yt).float().mean())
        params = sum(count_params(m) for m in modules) / src_params
        flops = sum(count_flops(m, shape) for m in modules) / src_flops
        rows.append(_report({**base, "strategy": "pan-rajan", "accuracy": acc,
                             "params_ratio": params, "flops_ratio": flops,
                             "own_seconds": own_seconds, "seconds": select_seconds + own_seconds,
                             "zeroed_channel_share": zeroed, "inactive_threshold": INACTIVE,
                             **claims}))
    return rows


def _report(row: dict) -> dict:
    row["delta_pp"] = 100 * (row["accuracy"] - row["restricted_accuracy"])
    print(f"{row['model']:<24} {str(row['task']):<22} {row['strategy']:<18} "
          f"restricted {row['restricted_accuracy']:.4f} strategy {row['accuracy']:.4f} "
          f"({row['delta_pp']:+.2f} pp) FLOPs {100 * row['flops_ratio']:.1f} % params "
          f"{100 * row['params_ratio']:.1f} % [{row['seconds']:.0f} s]", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="*", default=MODELS,
                        help="models to run; their rows replace those already in the JSON")
    parser.add_argument("--quick", action="store_true",
                        help="task {1,7} only, written to strategies-quick.json")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / ("strategies-quick.json" if args.quick
                                             else "strategies.json")
    old = json.loads(out.read_text()) if out.exists() else {}
    t0 = time.perf_counter()
    result = {"modellego_version": __version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "samples_per_class": K,
              "model_seconds": dict(old.get("model_seconds", {}))}
    rows = []
    for rel in args.models:
        t1 = time.perf_counter()
        rows += run_model(rel, TASKS[-1:] if args.quick else TASKS)
        result["model_seconds"][rel] = time.perf_counter() - t1
    result["rows"] = [r for r in old.get("rows", []) if r["model"] not in args.models] + rows
    result["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
