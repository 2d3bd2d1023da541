"""Disassembly benchmark: component accuracy and size on the shipped Fashion-MNIST models,
the cost of the contribution profile, and its peak memory on ResNet-50 at 224 px.

    .venv/bin/python benchmarks/disassembly.py [--quick]

Prints tables and writes benchmarks/results/disassembly.json. Every figure is measured in
this run; ratios compare runs made in the same process on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from modellego import DisassemblyConfig, __version__, disassemble, disassemble_model
from modellego.analysis.contribution import accumulate_class_contribution
from modellego.analysis.locate import LocateConfig, locate, profiled_layers
from modellego.analysis.profile import contribution_profile
from modellego.data import load_split, normalize
from modellego.files import load_model
from modellego.metrics import accuracy_from_logits, count_flops, predict_logits
from modellego.models import create_model
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.plan import plan_from_masks
from modellego.surgery.recalibrate import recalibrate_batchnorm
from modellego.workflows import sample_calibration_images

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["fashion-mnist/vgg16_bn", "fashion-mnist/resnet18", "digits/mobilenet_v2"]
TASKS = [(0, 1, 2), (3, 4, 5, 6, 7, 8, 9), (0, 2, 4, 6, 8), (1, 7)]
METHODS = {
    # the published method and defaults (count rule, alpha/beta from the public code)
    "paper": DisassemblyConfig.paper(()),
    # the previous release's best: the mass rule, its threshold searched on the validation
    # split against the observed accuracy (0.2 pp), the plain cut
    "mass-search": DisassemblyConfig.paper((), locate=LocateConfig(rule="mass"),
                                           max_accuracy_drop=0.2),
    # the default, no flags: the smallest component within 0.5 pp at 90 % confidence on
    # 500 validation images per class, every candidate reconstructed on 1000 task images
    "default": DisassemblyConfig(()),
}


def flops_target(task: tuple[int, ...]) -> float:
    """Issue 13's FLOPs targets: 25 % for {1,7}, 40 % for the other tasks of <= 3 classes,
    70 % for the larger ones."""
    if set(task) == {1, 7}:
        return 0.25
    return 0.40 if len(task) <= 3 else 0.70


#: the mass-rule thresholds of the accuracy-vs-FLOPs frontier on the hardest task
FRONTIER_BETAS = (0.3, 0.2, 0.15, 0.1, 0.08, 0.05, 0.03, 0.02, 0.01)


def component_rows(quick: bool, models: list[str]) -> list[dict]:
    rows = []
    for rel in models:
        path = ROOT / "checkpoints" / f"{rel}.safetensors"
        model, manifest = load_model(path)
        for task in TASKS[:2] if quick else TASKS:
            first = None  # every method shares the task's sample selection and profile
            for method, base in METHODS.items():
                cfg = replace(base, classes=task)
                t0 = time.perf_counter()
                try:
                    # the paper preset and the default each run as their command would,
                    # sample selection and profile included (as with --no-fingerprint:
                    # the router fingerprint is no part of either method); the old search
                    # reuses the paper's (its time is not compared)
                    comp, _, record = disassemble(model, manifest, cfg, source_path=path,
                                                  reuse=first if method == "mass-search"
                                                  else None, fingerprint=False)
                    rep = record.to_dict()
                    first = first or comp
                except Exception as exc:  # a method that cannot make a component: say so
                    rows.append({"model": rel, "task": list(task), "method": method,
                                 "error": str(exc)})
                    print(f"{rel:<24} {str(list(task)):<22} {method:<7} failed: {exc}")
                    continue
                row = {"model": rel, "task": list(task), "method": method,
                       "restricted_accuracy": rep["restricted_accuracy"],
                       "source_accuracy": rep["source_accuracy"],
                       "component_accuracy": rep["component_accuracy"],
                       "delta_pp": 100 * (rep["component_accuracy"] -
                                          rep["restricted_accuracy"]),
                       "flops_ratio": rep["flops_ratio"], "params_ratio": rep["params_ratio"],
                       "profile_seconds": rep["profile_seconds"],
                       "seconds": time.perf_counter() - t0,
                       "locate": comp.locate.to_dict()}
                row["flops_target"] = flops_target(task)
                row["meets_accuracy"] = row["delta_pp"] >= -0.5
                row["meets_flops"] = row["flops_ratio"] <= row["flops_target"]
                if "validation" in rep:
                    row["validation"] = rep["validation"]
                    row["candidates_measured"] = len(comp.search)
                rows.append(row)
                print(f"{rel:<24} {str(list(task)):<22} {method:<7} "
                      f"restricted {row['restricted_accuracy']:.4f} component "
                      f"{row['component_accuracy']:.4f} ({row['delta_pp']:+.2f} pp) FLOPs "
                      f"{100 * row['flops_ratio']:.1f} % params {100 * row['params_ratio']:.1f} %"
                      f" [{row['seconds']:.0f} s]", flush=True)
    return rows


def frontier(rel: str, task: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """Test accuracy against FLOPs along the mass rule's thresholds, with and without BN
    re-estimation: where the best trade-off of this task lies, searched or not."""
    path = ROOT / "checkpoints" / f"{rel}.safetensors"
    model, manifest = load_model(path)
    own = list(manifest.classes)
    train = load_split("fashion-mnist", "train")
    calib = sample_calibration_images(train, 2000)
    sub = train.subset(task)
    base = disassemble_model(model, normalize(sub.images, sub.info), sub.labels, classes=task,
                             output_classes=own,
                             config=DisassemblyConfig(task, locate=LocateConfig(rule="mass"),
                                                      reconstruct=0))
    test = load_split("fashion-mnist", "test").subset(task)
    x = normalize(test.images, test.info)
    restricted = accuracy_from_logits(predict_logits(model, x), test.labels, own,
                                      restrict_to=task).accuracy
    shape = tuple(x.shape[1:])
    source_flops = count_flops(model, shape)
    points = []
    for beta in FRONTIER_BETAS:
        cfg = LocateConfig(rule="mass", beta_conv=beta, beta_linear=beta)
        masks = locate(base.graph, base.profile, task, own, cfg)
        plan = plan_from_masks(base.graph, masks, [own.index(c) for c in task])
        comp = apply_plan(model, plan).eval()
        recal = copy.deepcopy(comp)
        recalibrate_batchnorm(recal, calib)
        point = {"beta": beta, "flops_ratio": count_flops(comp, shape) / source_flops}
        for key, net in (("component_accuracy", comp), ("recalibrated_accuracy", recal)):
            point[key] = accuracy_from_logits(predict_logits(net, x), test.labels,
                                              task).accuracy
        points.append(point)
        print(f"{rel:<24} {list(task)} beta {beta:<5} FLOPs {100 * point['flops_ratio']:5.1f} % "
              f"component {point['component_accuracy']:.4f} recalibrated "
              f"{point['recalibrated_accuracy']:.4f} (restricted {restricted:.4f})", flush=True)
    return [{"model": rel, "task": list(task), "restricted_accuracy": restricted,
             "points": points}]


def profile_cost_resnet50(batch: int = 32, repeats: int = 3) -> dict:
    """The same ratio at ImageNet resolution: ResNet-50, 224 px, random weights, one batch."""
    torch.manual_seed(0)
    model = create_model("resnet50", in_channels=3, num_classes=1000, input_size=224).eval()
    x = torch.randn(batch, 3, 224, 224)
    y = torch.zeros(batch, dtype=torch.long)
    graph = build_channel_graph(model, (3, 224, 224))
    layers = {lay.name: lay.module for lay in profiled_layers(graph)}
    with torch.inference_mode():
        model(x)  # warm up
    forward = profile = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(x)
        forward = min(forward, time.perf_counter() - t0)
        t0 = time.perf_counter()
        contribution_profile(model, layers, x, y, (0,), batch_size=batch)
        profile = min(profile, time.perf_counter() - t0)
    return {"model": "resnet50 (random weights), 224 px", "samples": batch,
            "forward_seconds": forward, "profile_seconds": profile,
            "profile_over_forward": profile / forward, "threads": torch.get_num_threads(),
            "timing": f"best of {repeats} alternating runs"}


def image_folder_224(root: Path, train: int = 60, test: int = 20, size: int = 224) -> Path:
    """``root/{train,test}/class<c>/``: 10 classes of seeded random RGB PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


#: the batch sizes the 224 px row's plain forward pass is timed with (the faster counts: a
#: CPU runs a ResNet-50 at 224 px faster in small batches, as the library's passes do)
FORWARD_BATCHES = (8, 32)


def default_at_224(task: tuple[int, ...] = (0, 1, 2), device: str | None = None) -> dict:
    """The default against the paper preset at ImageNet resolution: a torchvision ResNet-50
    imported from a seeded random state dict on a generated 224 px photo folder (10 classes
    x 60 training + 20 test images), each command timed as a whole, against one plain
    forward pass over every image the command reads (the training and test splits)."""
    import tempfile

    import torchvision
    from safetensors.torch import save_file

    from modellego import ImportConfig, import_model
    from modellego.data import load_split_for, model_input
    from modellego.runtime.device import using_device

    where = torch.device(device) if device else None

    def sync() -> None:
        if where is not None and where.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        root = image_folder_224(Path(tmp) / "photos")
        torch.manual_seed(0)
        net = torchvision.models.resnet50(num_classes=10).eval()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                  str(Path(tmp) / "w.safetensors"))
        model, manifest, _ = import_model(
            Path(tmp) / "w.safetensors",
            ImportConfig("torchvision:resnet50", f"folder:{root}", kwargs={"num_classes": 10},
                         evaluate=False))
        # one plain forward pass over every image the commands read (decoded beforehand)
        images = [model_input(load_split_for(manifest.own_dataset, split).images,
                              load_split_for(manifest.own_dataset, split).info,
                              manifest.input) for split in ("train", "test")]
        n = sum(len(x) for x in images)
        net = model.to(where) if where is not None else model
        with torch.inference_mode():  # warm up
            net(images[0][:2].to(where) if where is not None else images[0][:2])
        by_batch = {}
        for size in FORWARD_BATCHES:  # the faster of two batch sizes is the reference
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                for x in images:
                    for a in range(0, len(x), size):
                        net(x[a:a + size].to(where) if where is not None else
                            x[a:a + size])
            sync()
            by_batch[size] = time.perf_counter() - t0
        forward = min(by_batch.values())
        del images
        model = model.cpu()
        row: dict = {"model": "torchvision resnet50 (random weights), 224 px",
                     "task": list(task), "images_read": n, "forward_seconds": forward,
                     "forward_seconds_by_batch": by_batch,
                     "threads": torch.get_num_threads(), "device": str(where or "cpu")}
        for method, cfg in (("paper", DisassemblyConfig.paper(task)),
                            ("default", DisassemblyConfig(task))):
            t0 = time.perf_counter()
            if where is not None:
                with using_device(where):
                    comp, _, record = disassemble(model, manifest, cfg, fingerprint=False)
            else:
                comp, _, record = disassemble(model, manifest, cfg, fingerprint=False)
            rep = record.to_dict()
            sync()
            row[method] = {"seconds": time.perf_counter() - t0,
                           "flops_ratio": rep["flops_ratio"],
                           "component_accuracy": rep["component_accuracy"],
                           "restricted_accuracy": rep["restricted_accuracy"],
                           "candidates_measured": len(comp.search)}
            print(f"resnet50 224 px {method:<8} {row[method]['seconds']:.1f} s, FLOPs "
                  f"{100 * rep['flops_ratio']:.1f} %", flush=True)
    row["default_over_paper"] = row["default"]["seconds"] / row["paper"]["seconds"]
    row["default_over_forward"] = row["default"]["seconds"] / forward
    row["meets_3x_forward"] = row["default_over_forward"] <= 3.0
    print(f"resnet50 224 px: forward over {n} images {forward:.1f} s; default "
          f"x{row['default_over_paper']:.2f} the paper preset, x{row['default_over_forward']:.2f}"
          f" the forward pass", flush=True)
    return row


def naive_contribution(inp: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The definition, computed the slow way: every (q, p) output map is materialised."""
    b = inp.shape[0]
    cols = torch.nn.functional.unfold(inp.double(), conv.kernel_size, dilation=conv.dilation,
                                      padding=conv.padding, stride=conv.stride)
    p = conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    cols = cols.view(b, p, k, -1)                                  # (B, P, K, L)
    w = conv.weight.double().view(conv.out_channels, p, k)         # (Q, P, K)
    out = torch.empty(b, conv.out_channels, p, dtype=torch.float64)
    for q in range(conv.out_channels):                             # (B, P, K, L) per q
        out[:, q] = (w[q][None, :, :, None] * cols).sum((2, 3))
    return out


def profile_cost(samples: int = 150, repeats: int = 9,
                 rel: str = "fashion-mnist/vgg16_bn") -> dict:
    path = ROOT / "checkpoints" / f"{rel}.safetensors"
    model, manifest = load_model(path)
    train = load_split("fashion-mnist", "train").subset([0, 1, 2])
    x = normalize(train.images[:samples], train.info)
    y = train.labels[:samples]
    graph = build_channel_graph(model, tuple(x.shape[1:]))
    layers = {lay.name: lay.module for lay in profiled_layers(graph)}

    def plain_forward() -> None:
        with torch.inference_mode():
            for s in range(0, samples, 64):
                model(x[s:s + 64])

    def profile_pass() -> None:
        contribution_profile(model, layers, x, y, (0, 1, 2), batch_size=64)

    # best of `repeats` alternating runs of each: the machine may be shared (its speed
    # varies by 20-40 % between runs of a minute)
    plain_forward()
    profile_pass()  # warm up
    forward = profile = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_forward()
        forward = min(forward, time.perf_counter() - t0)
        t0 = time.perf_counter()
        profile_pass()
        profile = min(profile, time.perf_counter() - t0)
    # the naive method on a few samples, scaled to the same count
    few = 4
    convs = {n: m for n, m in layers.items() if isinstance(m, torch.nn.Conv2d)}
    captured = {}

    def hook(mod, inputs, output):
        captured[id(mod)] = inputs[0]

    handles = [m.register_forward_hook(hook) for m in convs.values()]
    try:
        with torch.inference_mode():
            model(x[:few])
    finally:
        for h in handles:
            h.remove()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for m in convs.values():
            accumulate_class_contribution(naive_contribution(captured[id(m)], m),
                                          torch.zeros(few, dtype=torch.long), 1)
    naive = (time.perf_counter() - t0) * samples / few
    return {"model": rel, "samples": samples,
            "forward_seconds": forward, "profile_seconds": profile,
            "profile_over_forward": profile / forward,
            "naive_seconds_estimated": naive, "naive_over_profile": naive / profile,
            "naive_measured_on_samples": few, "threads": torch.get_num_threads(),
            "timing": f"best of {repeats} alternating runs"}


_MEM_CHILD = r"""
import sys, torch
from modellego.models import create_model
from modellego.analysis.locate import profiled_layers
from modellego.analysis.profile import contribution_profile
from modellego.surgery.graph import build_channel_graph
torch.manual_seed(0)
mode = sys.argv[1]
m = create_model("resnet50", in_channels=3, num_classes=1000, input_size=224).eval()
x = torch.randn(32, 3, 224, 224)
y = torch.zeros(32, dtype=torch.long)
def hwm():  # this process's peak RSS in KiB (VmHWM starts afresh at exec; ru_maxrss
    # would keep the parent's peak from before the fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
base = hwm()
if mode == "forward":
    with torch.inference_mode():
        m(x)
else:
    g = build_channel_graph(m, (3, 224, 224))
    layers = {l.name: l.module for l in profiled_layers(g)}
    contribution_profile(m, layers, x, y, (0,), batch_size=32)
print(base, hwm())
"""


def profile_memory() -> dict:
    out = {}
    for mode in ("forward", "profile"):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", _MEM_CHILD, mode], capture_output=True,
                             text=True, check=True)
        before, peak = (int(v) for v in res.stdout.split())
        out[mode] = {"peak_rss_mb": peak / 1024, "before_mb": before / 1024,
                     "seconds": time.perf_counter() - t0}
    out["profile_peak_gb"] = out["profile"]["peak_rss_mb"] / 1024
    out["meets_4gb"] = out["profile_peak_gb"] <= 4.0
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="two tasks, no memory run")
    parser.add_argument("--models", nargs="*", default=MODELS,
                        help="models to run; their rows replace those already in the JSON")
    parser.add_argument("--skip-cost", action="store_true",
                        help="keep the profile cost and memory figures already in the JSON")
    parser.add_argument("--cost-only", action="store_true",
                        help="keep the component rows already in the JSON; measure cost and "
                             "memory only")
    parser.add_argument("--only-224", action="store_true",
                        help="run the 224 px row alone (the other figures stay as they are)")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / ("disassembly-quick.json" if args.quick
                                             else "disassembly.json")
    old = json.loads(out.read_text()) if out.exists() else {}
    t0 = time.perf_counter()
    result = {"modellego_version": __version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d")}
    if args.only_224:
        result = {**old, **{k: result[k] for k in ("modellego_version", "torch", "threads",
                                                   "machine")}}
        print("== the default at 224 px")
        result["default_224"] = default_at_224()
        result["default_224"]["date"] = time.strftime("%Y-%m-%d")
        return _finish(result, out, t0)
    if args.cost_only:
        result.update({k: old[k] for k in ("components", "frontier", "default_224")
                       if k in old})
    else:
        print("== components (test split; delta against the restricted source)")
        rows = component_rows(args.quick, args.models)
        result["components"] = [r for r in old.get("components", [])
                                if r["model"] not in args.models] + rows
    if not args.quick and not args.cost_only:
        print("== the default at 224 px")
        result["default_224"] = default_at_224()
        print("== accuracy against FLOPs on {0,1,2}")
        result["frontier"] = [r for r in old.get("frontier", [])
                              if r["model"] not in args.models]
        for rel in args.models:
            if rel.startswith("fashion-mnist/"):
                result["frontier"] += frontier(rel)
    if args.skip_cost and "profile_cost" in old:
        result["profile_cost"] = old["profile_cost"]
        if "profile_cost_224" in old:
            result["profile_cost_224"] = old["profile_cost_224"]
        if "memory" in old:
            result["memory"] = old["memory"]
        return _finish(result, out, t0)
    print("== profile cost (vgg16_bn, 150 samples)")
    result["profile_cost"] = profile_cost()
    pc = result["profile_cost"]
    if not args.quick:
        result["profile_cost_224"] = profile_cost_resnet50()
        big = result["profile_cost_224"]
        print(f"resnet50 224 px: forward {big['forward_seconds']:.2f} s, profile "
              f"{big['profile_seconds']:.2f} s (x{big['profile_over_forward']:.2f})")
    print(f"forward {pc['forward_seconds']:.3f} s, profile {pc['profile_seconds']:.3f} s "
          f"(x{pc['profile_over_forward']:.2f}); naive unfold ~{pc['naive_seconds_estimated']:.1f}"
          f" s (x{pc['naive_over_profile']:.0f} the profile)")
    if not args.quick:
        print("== peak memory, resnet50 224 px, batch 32, random weights")
        result["memory"] = profile_memory()
        mem = result["memory"]
        print(f"forward peak RSS {mem['forward']['peak_rss_mb']:.0f} MB, profile peak RSS "
              f"{mem['profile']['peak_rss_mb']:.0f} MB ({mem['profile']['seconds']:.0f} s)")
    return _finish(result, out, t0)


def _finish(result: dict, out: Path, t0: float) -> int:
    result["seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
