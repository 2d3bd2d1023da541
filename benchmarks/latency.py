"""Measured speed-ups: latency of source, component and compressed model, PyTorch eager and
onnxruntime, batch 1 and 32, against the FLOPs each removes.

    .venv/bin/python benchmarks/latency.py [--quick] [--repeats N] [--device cuda]

Models: the shipped checkpoints (28 px) and a torchvision ResNet-50 imported from a seeded
random state dict at 224 px (on a generated photo folder, as benchmarks/disassembly.py's 224 px
row). For each: the source, its component for classes {0, 1, 2} (the default command's; at
224 px the paper preset's, as the default takes minutes there) and the model compressed to
half its FLOPs (``contribution`` criterion, no reconstruction: the weights do not change the
time). Every network is exported to ONNX by ``modellego.export`` twice, with its channel
counts padded to multiples of 8 (the default) and as they are (``--align 1``), each checked
against PyTorch as the command does, and timed on this machine's CPU with the same thread
count for both runtimes: the median of ``--repeats`` runs after two warm-up runs, all
variants of one model timed in the same run so that their ratios are comparable. With
``--device cuda`` (a GPU machine), PyTorch eager runs there as well and onnxruntime uses its
CUDA provider when installed.

Goal (issue #32): for components with at least 3x fewer FLOPs, the measured latency ratio on
onnxruntime at batch 32 is within 1.5x of the FLOPs ratio. Writes
benchmarks/results/latency.json (latency-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from disassembly import image_folder_224  # noqa: E402

from modellego import (  # noqa: E402
    CompressConfig,
    DisassemblyConfig,
    __version__,
    disassemble,
    load_model,
)
from modellego.exporting import ContractInput, check_set, export_model  # noqa: E402
from modellego.files import open_model, save_model  # noqa: E402
from modellego.metrics import count_flops  # noqa: E402
from modellego.workflows import compress  # noqa: E402

SHIPPED = ["fashion-mnist/vgg16_bn", "fashion-mnist/resnet18", "digits/vgg16_bn",
           "digits/mobilenet_v2"]
TASK = (0, 1, 2)
BATCHES = (1, 32)


def median_seconds(run, x: torch.Tensor, repeats: int, sync=lambda: None) -> float:
    for _ in range(2):
        run(x)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ort_session(path: Path, threads: int, cuda: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), options, providers=providers)
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x.numpy()})), session.get_providers()[0]


def variants(path: Path, tmp: Path, data_dir=None, preset: str = "default"
             ) -> list[tuple[str, Path]]:
    """The source, its component for TASK (``preset``) and its half-FLOPs compression."""
    model, manifest = load_model(path)
    config = DisassemblyConfig.paper(TASK) if preset == "paper" else DisassemblyConfig(TASK)
    comp, comp_man, _ = disassemble(model, manifest, config, source_path=path,
                                    data_dir=data_dir, fingerprint=False)
    comp_path = tmp / f"{path.stem}-component.safetensors"
    save_model(comp_path, comp.model, comp_man)
    small, small_man, _ = compress(model, manifest,
                                   CompressConfig("contribution", target_flops=0.5,
                                                  reconstruct=0,
                                                  recalibrate_bn=0, samples_per_class=20),
                                   source_path=path, data_dir=data_dir, fingerprint=False)
    small_path = tmp / f"{path.stem}-compressed.safetensors"
    save_model(small_path, small, small_man)
    return [("source", path), (f"component {{0,1,2}} ({preset})", comp_path),
            ("compressed 50 %", small_path)]


def time_model(name: str, path: Path, tmp: Path, repeats: int, device: str,
               data_dir=None, preset: str = "default") -> list[dict]:
    threads = torch.get_num_threads()
    cuda = device.startswith("cuda")
    rows = []
    for variant, file in variants(path, tmp, data_dir, preset):
        loaded = open_model(file)
        shape = tuple(loaded.manifest.input.shape)
        images, source = check_set(loaded.manifest, count=8, data_dir=data_dir)
        sessions = {}
        for align in (8, 1):
            onnx_path = tmp / f"{file.stem}-align{align}.onnx"
            report = export_model(loaded.model, loaded.manifest, onnx_path, images=images,
                                  check_source=source, align=align)
            if align == 8:
                padded = report.channels_added
            sessions[align], provider = ort_session(onnx_path, threads, cuda)
        net = ContractInput(loaded.model, loaded.manifest.input.mean,
                            loaded.manifest.input.std).eval().to(device)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        def eager(x, net=net):
            with torch.inference_mode():
                return net(x.to(device))

        row = {"model": name, "variant": variant, "flops": count_flops(loaded.model, shape),
               "params": sum(p.numel() for p in loaded.model.parameters()),
               "exporter": report.exporter, "export_max_abs_diff": report.max_abs_diff,
               "channels_padded": padded, "onnxruntime_provider": provider, "ms": {}}
        gen = torch.Generator().manual_seed(0)
        for batch in BATCHES:
            x = torch.rand(batch, *shape, generator=gen)
            row["ms"][f"eager_b{batch}"] = 1000 * median_seconds(eager, x, repeats, sync)
            row["ms"][f"onnxruntime_b{batch}"] = 1000 * median_seconds(sessions[8], x, repeats)
            row["ms"][f"onnxruntime_unaligned_b{batch}"] = 1000 * median_seconds(
                sessions[1], x, repeats)
        print(f"{name:<28} {variant:<18} FLOPs {row['flops'] / 1e6:9.1f} M  " + "  ".join(
            f"{k} {v:8.2f} ms" for k, v in row["ms"].items()), flush=True)
        rows.append(row)
    src = rows[0]
    for row in rows:
        row["flops_ratio"] = src["flops"] / row["flops"]
        row["speedup"] = {k: src["ms"][k] / v for k, v in row["ms"].items()}
        if row is not src and row["flops_ratio"] >= 3:
            measured = row["speedup"]["onnxruntime_b32"]
            row["goal"] = "onnxruntime batch-32 speed-up within 1.5x of the FLOPs ratio"
            row["meets_goal"] = measured * 1.5 >= row["flops_ratio"]
    return rows


def resnet50_224(tmp: Path, repeats: int, device: str) -> list[dict]:
    import torchvision
    from safetensors.torch import save_file

    from modellego import ImportConfig, import_model

    root = image_folder_224(tmp / "photos", train=30, test=10)
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp / "w.safetensors"))
    model, manifest, _ = import_model(
        tmp / "w.safetensors",
        ImportConfig("torchvision:resnet50", f"folder:{root}", kwargs={"num_classes": 10},
                     evaluate=False))
    path = tmp / "resnet50.safetensors"
    save_model(path, model, manifest)
    return time_model("torchvision resnet50 224 px", path, tmp, repeats, device,
                      preset="paper")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="the shipped FM resnet18 only, 5 repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per measurement (default 20; 7 at 224 px)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (eager PyTorch)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result: dict = {"modellego_version": __version__, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "machine": platform.machine(),
                    "processor": platform.processor(), "device": args.device,
                    "date": time.strftime("%Y-%m-%d"), "rows": []}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shipped = ["fashion-mnist/resnet18"] if args.quick else SHIPPED
        for rel in shipped:
            result["rows"] += time_model(rel, ROOT / "checkpoints" / f"{rel}.safetensors", tmp,
                                         args.repeats or (5 if args.quick else 20), args.device)
        if not args.quick:
            result["rows"] += resnet50_224(tmp, args.repeats or 7, args.device)
    goals = [r for r in result["rows"] if "meets_goal" in r]
    result["goal_rows"] = len(goals)
    result["goal_met"] = sum(r["meets_goal"] for r in goals)
    result["seconds"] = time.perf_counter() - t0
    name = "latency-quick.json" if args.quick else "latency.json"
    out = ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"goal met on {result['goal_met']} of {result['goal_rows']} components with >= 3x "
          f"fewer FLOPs; wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
