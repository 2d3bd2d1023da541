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
- ``pan-rajan``: modules in the style of Pan & Rajan (ICSE'22), training-free, built here
  as a comparison baseline (not a library feature). For each class ``c`` of the task:
  the source is run on ``c``'s selected training samples (the same K = 50 most confident
  ones the other strategies profile); a channel of a channel space (see
  ``modellego.surgery.graph``) is *never active* for ``c`` when, at every conv/linear
  layer that reads it, its largest activation over those samples and all positions is at
  most 1 % of the largest activation of any channel of that layer's input (inputs of the
  shipped nets follow ReLUs; the image is never touched). Module ``c`` is a copy of the
  source whose weights reading never-active channels are set to zero in place, so it keeps
  the source's shape, params and FLOPs. Its binary concern head is
  ``score_c(x) = logit_c(x) - logsumexp_{j != c} logit_j(x)`` over the module's own logits
  (positive: "x is a c"). The task's prediction is the class whose module scores highest;
  its cost is (classes in the task) x the source's params and FLOPs.

Timing: every strategy selects the same samples except ``contribution-2022`` (correctly
classified only). The selection pass (one forward pass over the task's training images) runs
once per task and its time is added to every strategy's own time; when every selected
sample's true-class probability exceeds 0.5 (so it is the top class), the correctly
classified selection is the same and is reused. Every other figure is measured in this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from modellego import __version__
from modellego.analysis.hooks import forward_pre_hooks, preserved_state
from modellego.analysis.locate import LocateConfig, profiled_layers
from modellego.analysis.profile import SampleSelection, select_samples
from modellego.data import load_split, normalize
from modellego.disassemble import DisassemblyConfig, disassemble_model
from modellego.io import load_model
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
#: Pan & Rajan baseline: a channel is never active below this share of its layer input's max
INACTIVE = 0.01


def never_active(model: nn.Module, graph: ChannelGraph, images: torch.Tensor
                 ) -> dict[int, torch.Tensor]:
    """Per space, the channels whose activation stays at most ``INACTIVE`` x the layer
    input's maximum at every conv/linear layer reading them (on ``images``)."""
    layers = profiled_layers(graph)
    peaks: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            a = args[0].detach()
            dims = [0] + list(range(2, a.dim()))
            peaks[name] = a.amax(dim=dims).double()
        return hook

    with preserved_state(model), forward_pre_hooks(
            (lay.module, capture(lay.name)) for lay in layers), torch.inference_mode():
        model.eval()
        model(images)
    inactive = {s: torch.ones(graph.space_size[s], dtype=torch.bool)
                for s in {seg.space for lay in layers for seg in lay.in_layout}}
    for lay in layers:
        peak = peaks[lay.name]
        limit = INACTIVE * peak.max().clamp_min(0)
        offset = 0
        for seg in lay.in_layout:
            block = peak[offset:offset + seg.size * seg.repeat].view(seg.size, seg.repeat)
            offset += seg.size * seg.repeat
            inactive[seg.space] &= block.amax(1) <= limit
    for s in graph.frozen_spaces & set(inactive):
        inactive[s][:] = False
    return inactive


def zeroed_module(model: nn.Module, graph: ChannelGraph,
                  inactive: dict[int, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose conv/linear weights reading ``inactive`` channels are 0."""
    module = copy.deepcopy(model).eval()
    mods = dict(module.named_modules())
    with torch.no_grad():
        for lay in profiled_layers(graph):
            weight = mods[lay.name].weight
            offset = 0
            for seg in lay.in_layout:
                dead = inactive[seg.space].repeat_interleave(seg.repeat)
                cols = offset + dead.nonzero().flatten()
                weight[:, cols] = 0
                offset += seg.size * seg.repeat
    return module


def pan_rajan(model: nn.Module, graph: ChannelGraph, x: torch.Tensor,
              selection: SampleSelection, task: tuple[int, ...]
              ) -> tuple[list[nn.Module], list[float]]:
    """One zeroed module per class of ``task``; also the share of channels each zeroes."""
    modules, zeroed = [], []
    for c in task:
        inactive = never_active(model, graph, x[list(selection.indices[c])])
        modules.append(zeroed_module(model, graph, inactive))
        total = sum(graph.space_size[s] for s in inactive)
        zeroed.append(sum(int(m.sum()) for m in inactive.values()) / total)
    return modules, zeroed


def pan_rajan_predict(modules: list[nn.Module], task: tuple[int, ...],
                      output_classes: list[int], x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Scores ``(N, len(task))`` of the concern heads, and how often none or several claim x."""
    scores = []
    for module, c in zip(modules, task):
        logits = predict_logits(module, x).double()
        i = output_classes.index(c)
        others = torch.cat([logits[:, :i], logits[:, i + 1:]], 1)
        scores.append(logits[:, i] - torch.logsumexp(others, 1))
    s = torch.stack(scores, 1)
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
    own = list(manifest["classes"])
    splits = {name: load_split(manifest["dataset"]["name"], name)
              for name in ("train", "val", "test")}
    shape = tuple(manifest["input"]["shape"])
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
            cfg = DisassemblyConfig(task, samples_per_class=K, **options)
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
        modules, zeroed = pan_rajan(model, graph, x, selection, task)
        own_seconds = time.perf_counter() - t0
        scores, claims = pan_rajan_predict(modules, task, own, xt)
        pred = torch.tensor(task)[scores.argmax(1)]
        acc = float((pred == yt).float().mean())
        rows.append(_report({**base, "strategy": "pan-rajan", "accuracy": acc,
                             "params_ratio": float(len(task)), "flops_ratio": float(len(task)),
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
