"""Data-parallel selection and profile: the same bits for any number of processes."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import run_cli
from modellego.analysis.locate import profiled_layers
from modellego.analysis.profile import (
    ClassSums,
    contribution_profile,
    profile_chunk,
    select_samples,
)
from modellego.data import load_split
from modellego.models import create_model
from modellego.runtime.distributed import SINGLE, DistContext, chunk_ranges, init_from_env
from modellego.surgery.graph import build_channel_graph

TIMING = {"profile_seconds", "total_seconds"}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                           b.reshape(-1).contiguous().view(torch.uint8))
    return torch.equal(a, b)


def assert_same_profile(a, b) -> None:
    assert a.classes == b.classes and a.samples == b.samples
    assert a.layers.keys() == b.layers.keys() and a.means.keys() == b.means.keys()
    for name in a.layers:
        assert same_bits(a.layers[name], b.layers[name]), name
        assert same_bits(a.means[name], b.means[name]), name


@pytest.fixture(scope="module")
def setup():
    """A random-weight ResNet-18 (BN statistics randomised) and labelled random inputs."""
    torch.manual_seed(0)
    model = create_model("resnet18", in_channels=3, num_classes=10, input_size=16, width=0.25)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(300, 3, 16, 16)
    y = torch.randint(0, 10, (300,))
    graph = build_channel_graph(model, (3, 16, 16))
    layers = {lay.name: lay.module for lay in profiled_layers(graph)}
    return model, layers, x, y


# --------------------------------------------------------------------------- in process


class ThreadWorld:
    """``size`` ranks emulated by threads; ``all_gather`` meets at a barrier."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * size

    def run(self, fn) -> list:
        """``fn(ctx)`` on every rank, each in its own thread; the results in rank order."""
        results: list = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(ThreadRank(self, rank))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadRank(DistContext):
    def __init__(self, world: ThreadWorld, rank: int) -> None:
        super().__init__(rank, world.size)
        self.world = world

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.world.slots[self.rank] = tensor.detach().clone()
        self.world.barrier.wait()
        out = [t.clone() for t in self.world.slots]
        self.world.barrier.wait()
        return out


def test_single_process_context_from_empty_environment():
    assert init_from_env({}) is SINGLE
    assert init_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is SINGLE
    assert SINGLE.is_main and not SINGLE.distributed and SINGLE.owns(5)
    t = torch.arange(3.0)
    assert SINGLE.all_gather(t)[0] is t
    SINGLE.close()
    assert not torch.distributed.is_initialized()


def test_chunk_ranges_cover_the_samples_in_order():
    assert chunk_ranges(150, 64) == [(0, 64), (64, 128), (128, 150)]
    assert chunk_ranges(0, 64) == []
    ctx = DistContext(1, 3)
    assert [j for j in range(7) if ctx.owns(j)] == [1, 4]


def test_chunk_results_fold_to_the_same_bits_whatever_rank_computes_them(setup):
    """Chunks computed rank by rank (world size 3, round robin) and folded in chunk order
    give exactly the single-process profile."""
    model, layers, x, y = setup
    classes = (3, 1, 7)
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep]
    rows = torch.tensor([classes.index(int(c)) for c in y])
    chunks = chunk_ranges(len(x), 16)
    assert len(chunks) >= 5  # sums of 3+ terms: their order shows in the bits
    results: dict[int, list] = {}
    for rank in range(3):  # rank 2 first would do just as well: only the fold order counts
        for j, (start, stop) in enumerate(chunks):
            if j % 3 == rank:
                calls: list = []
                profile_chunk(model, layers, x[start:stop], rows[start:stop],
                              lambda *a, calls=calls: calls.append(a))
                results[j] = calls
    sums = ClassSums(len(classes))
    for j in range(len(chunks)):
        for call in results[j]:
            sums.add(*call)
    ref = contribution_profile(model, layers, x, y, classes, batch_size=16)
    for name in ref.layers:
        assert same_bits(sums.totals[name], ref.layers[name]), name
        assert same_bits(sums.signed[name] / len(x), ref.means[name]), name


@pytest.mark.parametrize("world, batch", [(2, 8), (3, 10), (5, 16), (4, 64)])
def test_selection_and_profile_are_identical_for_emulated_world_sizes(setup, world, batch):
    """Threads stand in for ranks. 75 samples: each class spans several chunks (so several
    ranks); (5, 16) and (4, 64) leave ranks without a chunk in the last round."""
    model, layers, x, y = setup
    classes = (3, 1, 7)

    def job(ctx: DistContext):
        net = copy.deepcopy(model)  # hooks are per module: one copy per emulated rank
        lays = {n: net.get_submodule(n) for n in layers}
        sel = select_samples(net, x, y, classes, range(10), k=25, batch_size=12, dist=ctx)
        idx = sel.all_indices()
        prof = contribution_profile(net, lays, x[idx], y[idx], classes, batch_size=batch,
                                    dist=ctx)
        return sel, prof

    ref_sel, ref_prof = job(SINGLE)
    for sel, prof in ThreadWorld(world).run(job):
        assert sel == ref_sel
        assert_same_profile(prof, ref_prof)


# --------------------------------------------------------------------------- torchrun


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_write_the_single_process_bytes(tmp_path: Path):
    from modellego.files import save_model
    from modellego.training import TrainConfig, train

    model, manifest = train(TrainConfig(arch="simnet", dataset="digits", epochs=2, width=0.25,
                                        batch_size=32), progress=False)
    save_model(tmp_path / "model.safetensors", model, manifest)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # 150 samples: 3 profile chunks of 64, classes straddling chunk (and rank) boundaries
    args = ["disassemble", "../model.safetensors", "--classes", "1,3,5",
            "--samples-per-class", "50", "--out", "out.safetensors", "--report", "report.json"]
    runs = {
        "single": [sys.executable, "-m", "modellego", *args],
        "dist": [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                 "--nproc-per-node", "2", "--rdzv-backend", "static",
                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                 "-m", "modellego", *args],
    }
    out = {}
    for name, cmd in runs.items():
        (tmp_path / name).mkdir()
        proc = subprocess.run(cmd, cwd=tmp_path / name, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = proc.stdout
    assert out["dist"].count("wrote out.safetensors") == 1  # only rank 0 prints
    assert sorted(p.name for p in (tmp_path / "dist").iterdir()) == ["out.safetensors",
                                                                      "report.json"]
    single = (tmp_path / "single" / "out.safetensors").read_bytes()
    assert (tmp_path / "dist" / "out.safetensors").read_bytes() == single
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in runs]
    for rep in reports:
        rep.get("reconstruction", {}).pop("seconds", None)  # a timing, as TIMING
        assert TIMING <= rep.keys()
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in reports] == [
        {k: v for k, v in reports[0].items() if k not in TIMING}] * 2


@pytest.mark.parametrize("scaling", ["logit", "calibrated"])
def test_assembly_calibration_is_identical_for_emulated_world_sizes(scaling):
    """Calibration forward passes are shared out in fixed chunks: any world size gives the
    same buffers, bit for bit, as one process."""
    from modellego.assembly import AssemblyConfig
    from modellego.workflows import assemble

    parts = []
    for seed, classes in ((0, (0, 1, 2)), (1, (5, 6))):
        torch.manual_seed(seed)
        net = create_model("simnet", in_channels=1, num_classes=len(classes), input_size=28,
                           width=0.25).eval()
        info = load_split("digits", "test").info
        parts.append((net, {"kind": "model", "architecture": {"name": "simnet", "kwargs": {
            "in_channels": 1, "num_classes": len(classes), "input_size": 28, "width": 0.25}},
            "dataset": info.to_dict(), "classes": list(classes),
            "class_names": [info.class_names[c] for c in classes],
            "input": {"shape": [1, 28, 28], "mean": list(info.mean), "std": list(info.std)}}))
    config = AssemblyConfig(scaling=scaling, calibration_samples=70)

    def job(ctx: DistContext):
        # threads share memory: give each emulated rank its own copy of the networks, whose
        # feature taps register hooks while they run
        return assemble(copy.deepcopy(parts), config, dist=ctx)[0].state_dict()

    single = assemble(parts, config)[0].state_dict()
    for world in (2, 3):
        for state in ThreadWorld(world).run(job):
            assert state.keys() == single.keys()
            for key in single:
                assert same_bits(state[key], single[key]), (world, key)


# --------------------------------------------------------------------------- bad environments

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "MODELLEGO_DIST_TIMEOUT", "TORCHELASTIC_USE_AGENT_STORE")
_FIX = "start the command with torchrun, or unset WORLD_SIZE to run in one process"
_PEER = {"MASTER_ADDR": "127.0.0.1"}


@pytest.fixture(scope="module")
def model_file(simnet_digits_file: Path) -> Path:
    return simnet_digits_file


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "environment variable RANK is not set but WORLD_SIZE=2 asks for a "
                          f"distributed run; {_FIX}"),
    ({"WORLD_SIZE": "two"}, f"environment variable WORLD_SIZE='two' is not an integer; {_FIX}"),
    ({"WORLD_SIZE": "2", "RANK": "5", **_PEER},
     f"environment variable RANK=5 must be from 0 to 1; {_FIX}"),
    ({"WORLD_SIZE": "2", "RANK": "-1", **_PEER},
     f"environment variable RANK=-1 must be from 0 to 1; {_FIX}"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", **_PEER},
     f"environment variable LOCAL_RANK=1 must be from 0 to 0; {_FIX}"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "2", **_PEER},
     f"environment variable LOCAL_RANK=3 must be below LOCAL_WORLD_SIZE=2; {_FIX}"),
    ({"WORLD_SIZE": "2", "RANK": "1"},
     f"environment variable MASTER_ADDR is not set but WORLD_SIZE=2 asks for a distributed "
     f"run; {_FIX}"),
    ({"WORLD_SIZE": "2", "RANK": "1", **_PEER, "MASTER_PORT": "http"},
     f"environment variable MASTER_PORT='http' is not an integer; {_FIX}"),
    ({"WORLD_SIZE": "2", "RANK": "1", **_PEER, "MASTER_PORT": "29500",
      "MODELLEGO_DIST_TIMEOUT": "soon"},
     "environment variable MODELLEGO_DIST_TIMEOUT='soon' must be a number of seconds > 0; "
     "e.g. 60"),
], ids=["no-rank", "world-not-int", "rank-too-big", "rank-negative", "local-rank-above-rank",
        "local-rank-above-local-world", "no-master-addr", "port-not-int", "bad-timeout"])
def test_bad_torchrun_environment_is_a_one_line_error(env: dict, message: str,
                                                      model_file: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    # these used to end in a KeyError/ValueError traceback, or (RANK=5) hang until killed;
    # the RANK=5 case runs in a child with a hard time limit, the others in this process
    # (the environment is refused before any process group is made)
    out = tmp_path / "part.safetensors"
    argv = ["disassemble", model_file, "--classes", "1,3", "--out", out]
    if env.get("RANK") == "5":
        from subproc import run_capped

        result = run_capped(argv, margin=64 << 30, timeout=60,
                            env={**dict.fromkeys(_DIST_VARS), **env})
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        for key in _DIST_VARS:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code, stdout, stderr = run_cli([str(a) for a in argv])
    assert code == 2, stderr[-3000:]
    assert stderr == f"modellego disassemble: error: {message}\n"
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize("rank", ["0", "1"], ids=["master-waits", "client-waits"])
def test_missing_peer_times_out_with_a_one_line_error(rank: str, model_file: Path,
                                                      tmp_path: Path):
    # rank 0 waiting for a rank 1 that never starts (or the reverse) used to wait 30 min
    import time

    from subproc import run_capped

    port = free_port()
    start = time.monotonic()
    result = run_capped(["disassemble", model_file, "--classes", "1,3", "--out",
                         tmp_path / "part.safetensors"], margin=64 << 30, timeout=60,
                        env={**dict.fromkeys(_DIST_VARS), "WORLD_SIZE": "2", "RANK": rank,
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                             "MODELLEGO_DIST_TIMEOUT": "3"})
    assert time.monotonic() - start < 45
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith(
        f"modellego disassemble: error: rank {rank} of 2: the processes did not all meet at "
        f"127.0.0.1:{port} within 3 s ("), result.stderr
    assert result.stderr.endswith("); start every rank (torchrun), check MASTER_ADDR and "
                                  "MASTER_PORT, or raise MODELLEGO_DIST_TIMEOUT\n")
    assert list(tmp_path.iterdir()) == []
