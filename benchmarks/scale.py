"""Scale benchmark: a 1000-class torchvision ResNet-50 (random weights) disassembled for all
its classes from a generated folder of 224 px photos, streamed from disk.

    .venv/bin/python benchmarks/scale.py [--classes 1000] [--train 3] [--test 1]
                                         [--max-memory 4G] [--workers 1] [--keep DIR]

Steps, each in its own process (so that its peak RSS is its own):

1. write ``classes`` class folders of JPEG photos of random sizes (224..400 px a side) in
   ``train/`` and ``test/`` layout;
2. ``modellego import torchvision:resnet50`` with a random state dict, ``--input-size 224``;
3. a plain forward pass over the training images the disassembly profiles, streamed the
   same way (same DataLoader workers, batch 64);
4. ``modellego disassemble MODEL --classes 0-(classes-1) --samples-per-class train``:
   every class; the profile is made in chunks of classes within ``--max-memory``.

The folder is streamed as a folder too large for memory would be
(``MODELLEGO_STREAM_ABOVE_MB=0``). Prints and saves (benchmarks/results/scale.json) the
seconds and peak RSS of each step and the ratios of the disassembly (and of its profile
pass) to the plain forward pass, all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLI = ["-m", "modellego"]


def write_folder(root: Path, classes: int, train: int, test: int, seed: int = 0) -> int:
    """Random-size JPEG photos, a colour tint per class; returns the number of files."""
    rng = np.random.default_rng(seed)
    n = 0
    for part, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = root / part / f"c{c:04d}"
            folder.mkdir(parents=True)
            tint = rng.integers(0, 256, 3)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(224, 401, 2))
                noise = rng.integers(0, 64, (h // 8, w // 8, 3))
                small = np.clip(tint * 0.75 + noise, 0, 255).astype(np.uint8)
                im = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
                im.save(folder / f"{i}.jpg", quality=85)
                n += 1
    return n


def measured(argv: list[str], env: dict[str, str]) -> dict:
    """Run ``argv`` (``["-m", module, ...]`` or ``["-c", code, ...]``) in a new Python; its
    seconds and the peak RSS of it and of its children (the DataLoader workers)."""
    runner = ("import json, resource, runpy, sys, time\n"
              "kind, target, *rest = json.loads(sys.argv[1])\n"
              "sys.argv = [target] + rest\n"
              "t0 = time.perf_counter()\n"
              "status = 0\n"
              "try:\n"
              "    if kind == '-m':\n"
              "        runpy.run_module(target, run_name='__main__', alter_sys=True)\n"
              "    else:\n"
              "        exec(compile(target, 'step', 'exec'), {'__name__': '__main__'})\n"
              "except SystemExit as exc:\n"
              "    status = exc.code or 0\n"
              "seconds = time.perf_counter() - t0\n"
              "me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
              "print('@@' + json.dumps({'status': status, 'seconds': seconds,\n"
              "                         'peak_rss_mib': me / 1024,\n"
              "                         'worker_peak_rss_mib': kids / 1024}))\n"
              "sys.exit(status)\n")
    proc = subprocess.run([sys.executable, "-c", runner, json.dumps(argv)], env=env,
                          capture_output=True, text=True)
    tail = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@{")]
    if proc.returncode or not tail:
        sys.exit(f"step failed ({proc.returncode}): {' '.join(argv)[:300]}\n"
                 f"{proc.stderr[-2000:]}")
    out = json.loads(tail[-1][2:])
    for ln in proc.stdout.splitlines():  # a step's own timing of its pass
        if ln.startswith("@@pass "):
            out["pass_seconds"] = float(ln.split()[1])
    out["stdout"] = [ln for ln in proc.stdout.splitlines() if not ln.startswith("@@")][-6:]
    return out


FORWARD = """
import sys, time, torch
from modellego.data import reading, load_split_for, model_input, iter_slices
from modellego.files import load_model
model, manifest = load_model(sys.argv[1])
train = load_split_for(manifest.own_dataset, "train")
x = model_input(train.images, train.info, manifest.input)
t0 = time.perf_counter()
with reading(workers=int(sys.argv[2])), torch.inference_mode():
    n = sum(len(model(b)) for b in iter_slices(x, 64))
print(f"@@pass {time.perf_counter() - t0}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--train", type=int, default=3, help="training photos per class")
    ap.add_argument("--test", type=int, default=1, help="test photos per class")
    ap.add_argument("--max-memory", default="4G")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", default=None, help="write the folder and files here and keep them")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args()

    import torch
    import torchvision
    from safetensors.torch import save_file

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="modellego-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MODELLEGO_STREAM_ABOVE_MB="0",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result: dict = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                    "torch": torch.__version__, "torchvision": torchvision.__version__,
                    "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
                    "classes": args.classes, "train_per_class": args.train,
                    "test_per_class": args.test, "max_memory": args.max_memory,
                    "workers": args.workers}
    try:
        photos = work / "photos"
        if not photos.exists():
            t0 = time.perf_counter()
            result["files"] = write_folder(photos, args.classes, args.train, args.test)
            result["write_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"wrote {result['files']} photos in {result['write_seconds']} s", flush=True)
        torch.manual_seed(0)
        net = torchvision.models.resnet50(num_classes=args.classes)
        weights = work / "resnet50-random.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        model = work / "resnet50.safetensors"
        result["import"] = measured(
            CLI + ["import", "torchvision:resnet50", "--weights", str(weights), "--dataset",
                   f"folder:{photos}", "--input-size", "224", "--no-evaluate",
                   "--workers", str(args.workers), "--out", str(model)], env)
        print(f"import: {result['import']['seconds']:.1f} s", flush=True)
        result["forward"] = measured(["-c", FORWARD, str(model),
                                      str(args.workers)], env)
        print(f"plain forward: {result['forward']['seconds']:.1f} s, "
              f"{result['forward']['peak_rss_mib']:.0f} MiB", flush=True)
        # the seeded validation carve may take every training photo of a class: those few
        # classes have nothing to profile and are left out (their count is recorded)
        os.environ["MODELLEGO_STREAM_ABOVE_MB"] = "0"
        from modellego.data import load_split

        labels = load_split(f"folder:{photos}", "train", image_size=(224, 224)).labels
        present = sorted(set(labels.tolist()))
        result["classes_profiled"] = len(present)
        spans, start = [], present[0]
        for a, b in zip(present, present[1:] + [None]):
            if b != a + 1:
                spans.append(f"{start}-{a}" if a > start else str(start))
                start = b
        report = work / "report.json"
        result["disassemble"] = measured(
            CLI + ["disassemble", str(model), "--classes", ",".join(spans),
                   "--samples-per-class", str(args.train), "--max-memory", args.max_memory,
                   "--workers", str(args.workers), "--out", str(work / "all.safetensors"),
                   "--report", str(report)], env)
        rep = json.loads(report.read_text())
        result["report"] = {k: rep.get(k) for k in (
            "profile_seconds", "total_seconds", "profile_chunks", "selection_pool",
            "source_accuracy", "component_accuracy", "flops_ratio", "params_ratio", "n")}
        result["report"]["profiled_images"] = sum(rep["samples_per_class"].values())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    fwd = result["forward"]["pass_seconds"]
    dis = result["disassemble"]
    # the forward pass is over the images the profile reads: the end-to-end command also
    # reads the test split twice (source and component) for its report
    result["profile_vs_forward"] = round(result["report"]["profile_seconds"] / fwd, 2)
    result["disassemble_vs_forward"] = round(dis["seconds"] / result["forward"]["seconds"], 2)
    imgs = result["report"]["profiled_images"] + 2 * result["report"]["n"]
    result["forward_images"] = result["report"]["profiled_images"]
    result["disassemble_vs_forward_over_every_image_read"] = round(
        dis["seconds"] / (result["forward"]["seconds"] * imgs
                          / result["report"]["profiled_images"]), 2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("import",)}, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
