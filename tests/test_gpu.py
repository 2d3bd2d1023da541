"""On a real CUDA device (``pytest -m gpu``; ``scripts/gpu-check.sh`` runs these on a lent
GPU machine, and ``make test`` deselects them: the CI machine has no GPU). The library's
CUDA path gives what its CPU path gives: the profile, the staged reconstruction, the
default disassembly and an assembly through the command line."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli
from modellego.analysis.locate import profiled_layers
from modellego.analysis.profile import contribution_profile
from modellego.files import load_model
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import build_channel_graph
from modellego.surgery.reconstruct import reconstruct_layers
from test_reconstruct_layouts import PATTERNS, pattern, random_plan

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda() -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device (run them with -m gpu " \
                                      "on a GPU machine only)"


def test_the_profile_on_cuda_equals_the_cpu_one():
    torch.manual_seed(0)
    net = PATTERNS["shared input, concat, shuffle"][0]().eval()
    graph = build_channel_graph(net, (2, 8, 8))
    layers = {lay.name: lay.module for lay in profiled_layers(graph)}
    x, y = torch.randn(20, 2, 8, 8), torch.arange(20) % 5
    cpu = contribution_profile(net, layers, x, y, (0, 2))
    gnet = net.cuda()
    glayers = {n: dict(gnet.named_modules())[n] for n in layers}
    gpu = contribution_profile(gnet, glayers, x.cuda(), y.cuda(), (0, 2))
    for name in layers:
        for c in (0, 2):
            a, b = cpu.for_class(name, c), gpu.for_class(name, c).cpu()
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max())), name


@pytest.mark.parametrize("name", list(PATTERNS))
def test_the_staged_reconstruction_on_cuda_equals_the_cpu_one(name):
    net, x, graph = pattern(name, 1, 30)
    plan = random_plan(net, graph, seed=5)
    cpu = apply_plan(net, plan).eval()
    fits = reconstruct_layers(cpu, net, graph, plan, x, max_rows=60, batch_size=8)
    gnet = net.cuda()
    ggraph = build_channel_graph(gnet, (2, 8, 8))
    gpu = apply_plan(gnet, plan).eval()
    gfits = reconstruct_layers(gpu, gnet, ggraph, plan, x, max_rows=60, batch_size=8)
    assert [f.name for f in gfits.layers] == [f.name for f in fits.layers]
    for (k, a), (_, b) in zip(cpu.state_dict().items(), gpu.state_dict().items()):
        assert b.device.type == "cuda"
        assert torch.allclose(a, b.cpu(), rtol=1e-3, atol=1e-5), k


def test_the_default_disassembly_and_an_assembly_run_on_cuda(simnet_digits_file, tmp_path):
    parts = []
    for classes in ("0,1,2", "3,4"):
        runs = {}
        for device in ("cpu", "cuda"):
            out = tmp_path / f"{device}-{classes}.safetensors"
            code, _, err = run_cli(["disassemble", simnet_digits_file, "--classes", classes,
                                    "--device", device, "--out", out])
            assert code == 0, err
            runs[device] = load_model(out)
        cpu_man, gpu_man = runs["cpu"][1], runs["cuda"][1]
        # the same task; the search may stop one step apart where a prediction ties
        assert gpu_man["classes"] == cpu_man["classes"]
        assert abs(gpu_man["metrics"]["test_accuracy"] -
                   cpu_man["metrics"]["test_accuracy"]) <= 0.02
        parts.append(tmp_path / f"cuda-{classes}.safetensors")
    code, _, err = run_cli(["assemble", *parts, "--device", "cuda", "--out",
                            tmp_path / "asm.safetensors", "--report", tmp_path / "asm.json"])
    assert code == 0, err
    model, manifest = load_model(tmp_path / "asm.safetensors")
    assert manifest["classes"] == [0, 1, 2, 3, 4]
    report = json.loads((tmp_path / "asm.json").read_text())
    assert report
