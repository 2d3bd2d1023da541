"""--device: which device each spelling names (CUDA mocked where this machine has none), the
one-line errors, and CPU results equal to a run without the flag."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import run_cli
from modellego.errors import ModelLegoError
from modellego.files import load_model
from modellego.runtime import device as dev
from modellego.runtime.device import (
    current_device,
    device_of,
    placed,
    resolve_device,
    to_device_of,
    using_device,
)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_spellings_without_a_gpu(no_gpu) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(ModelLegoError, match=r"^`device` cuda: CUDA is not available here"):
        resolve_device("cuda")
    with pytest.raises(ModelLegoError, match=r"^`device` cuda:0: CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ModelLegoError, match="no usable Apple GPU"):
        resolve_device("mps")
    for bad in ("tpu", "cuda:x", "cuda:-1", "cuda0"):
        with pytest.raises(ModelLegoError, match="is not a device; use auto, cpu, cuda"):
            resolve_device(bad)


def test_spellings_with_two_gpus(two_gpus) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)  # torchrun
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ModelLegoError, match=r"has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    with pytest.raises(ModelLegoError, match="has 2 CUDA device"):
        resolve_device("auto", local_rank=3)


def test_mps_when_there_is_no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")


def test_models_stay_where_they_are_unless_a_device_is_set() -> None:
    net = nn.Linear(3, 2)
    assert current_device() is None and device_of(net) == torch.device("cpu")
    assert device_of(nn.ReLU()) == torch.device("cpu")  # no parameters
    x = torch.ones(1, 3)
    assert to_device_of(x, net) is x  # already there: not copied
    with placed(net):
        assert device_of(net) == torch.device("cpu")
    with using_device(torch.device("cpu")):
        assert current_device() == torch.device("cpu")
        with placed(net):
            assert device_of(net) == torch.device("cpu")
    assert current_device() is None


def test_cli_device_errors_are_one_line(simnet_digits_file, no_gpu) -> None:
    for argv in (["evaluate", simnet_digits_file, "--device", "cuda", "--no-latency"],
                 ["evaluate", simnet_digits_file, "--device", "cuda:3", "--no-latency"],
                 ["evaluate", simnet_digits_file, "--device", "gpu", "--no-latency"]):
        code, out, err = run_cli(argv)
        assert code == 2 and out == ""
        assert err.startswith("modellego evaluate: error: --device ") and err.count("\n") == 1


def test_cpu_results_equal_a_run_without_the_flag(simnet_digits_file, tmp_path) -> None:
    runs = []
    for extra in ([], ["--device", "cpu"], ["--device", "auto"]):
        code, out, err = run_cli(["evaluate", simnet_digits_file, "--json", "--no-latency"]
                                 + extra)
        assert code == 0, err
        comp = tmp_path / f"c{len(runs)}.safetensors"
        code, _, err = run_cli(["disassemble", simnet_digits_file, "--classes", "1,7",
                                "--samples-per-class", "10", "--out", comp] + extra)
        assert code == 0, err
        model, manifest = load_model(comp)
        runs.append((json.loads(out), model.state_dict(), manifest))
    (ev0, state0, man0), *others = runs
    for ev, state, man in others:  # (the files differ in the command line they record)
        assert ev == ev0 and man["plan"] == man0["plan"]
        assert man["metrics"] == man0["metrics"]
        assert state.keys() == state0.keys()
        assert all(torch.equal(state[k], state0[k]) for k in state)
