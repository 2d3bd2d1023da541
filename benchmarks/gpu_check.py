"""The GPU check (``scripts/gpu-check.sh`` runs it after the suite's GPU tests): on CUDA,
the 224 px row of the disassembly benchmark (default against the paper preset and one
plain forward pass), the profile pass against a forward pass at 224 px, and an assembly of
two shipped digits models' components. Writes benchmarks/results/gpu-check.json.

    python benchmarks/gpu_check.py [--tests-summary "N passed, ..."]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from disassembly import default_at_224  # noqa: E402

from modellego import __version__  # noqa: E402
from modellego.analysis.locate import profiled_layers  # noqa: E402
from modellego.analysis.profile import contribution_profile  # noqa: E402
from modellego.models import create_model  # noqa: E402
from modellego.surgery.graph import build_channel_graph  # noqa: E402


def synced(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile_over_forward(batch: int = 32, repeats: int = 5) -> dict:
    """ResNet-50 (random weights), 224 px, one batch, on the GPU: best of ``repeats``."""
    torch.manual_seed(0)
    model = create_model("resnet50", in_channels=3, num_classes=1000, input_size=224).eval()
    graph = build_channel_graph(model, (3, 224, 224))
    model = model.cuda()
    layers = {lay.name: dict(model.named_modules())[lay.name] for lay in profiled_layers(graph)}
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.zeros(batch, dtype=torch.long, device="cuda")

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def profile() -> None:
        contribution_profile(model, layers, x, y, (0,), batch_size=batch)

    forward(), profile()  # warm up
    f = min(synced(forward) for _ in range(repeats))
    p = min(synced(profile) for _ in range(repeats))
    return {"forward_seconds": f, "profile_seconds": p, "profile_over_forward": p / f,
            "samples": batch}


def assembly_on_gpu() -> dict:
    """Components of the two shipped digits models, cut and assembled by the CLI on CUDA."""
    from modellego.cli import main as cli

    ck = ROOT / "checkpoints" / "digits"
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for src, classes, name in ((ck / "vgg16_bn.safetensors", "0,1,2,3,4", "a"),
                                   (ck / "mobilenet_v2.safetensors", "5,6,7,8,9", "b")):
            code = cli(["disassemble", str(src), "--classes", classes, "--device", "cuda",
                        "--out", f"{tmp}/{name}.safetensors"])
            if code != 0:
                return {"status": f"failed: disassemble {src.name} exited {code}"}
        out["disassemble_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        code = cli(["assemble", f"{tmp}/a.safetensors", f"{tmp}/b.safetensors", "--device",
                    "cuda", "--out", f"{tmp}/ab.safetensors", "--report",
                    f"{tmp}/ab.json"])
        out["assemble_seconds"] = time.perf_counter() - t0
        if code != 0:
            return {**out, "status": f"failed: assemble exited {code}"}
        report = json.loads(Path(f"{tmp}/ab.json").read_text())
        out["report"] = {k: v for k, v in report.items() if isinstance(v, (int, float, str))}
    out["status"] = "ok"
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tests-summary", default=None,
                        help="the closing line of the GPU tests' pytest run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; run it on a GPU machine")
        return 2
    t0 = time.perf_counter()
    result: dict = {"modellego_version": __version__, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0), "machine": platform.machine(),
                    "date": time.strftime("%Y-%m-%d"), "tests": args.tests_summary}
    out = ROOT / "benchmarks" / "results" / "gpu-check.json"
    steps = (("profile_224", profile_over_forward),
             ("default_224", lambda: default_at_224(device="cuda")),
             ("assembly", assembly_on_gpu))
    for name, step in steps:
        s0 = time.perf_counter()
        try:
            result[name] = step()
        except Exception as exc:  # the check records what failed and goes on
            result[name] = {"status": f"failed: {type(exc).__name__}: {exc}"}
        result[name]["step_seconds"] = time.perf_counter() - s0
        print(name, json.dumps(result[name])[:400], flush=True)
        result["seconds"] = time.perf_counter() - t0
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
