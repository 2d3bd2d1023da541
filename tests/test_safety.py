"""Safety through the command line, and hook/mode hygiene on every architecture.

* Nothing from a file is ever unpickled: crafted pickle / ``torch.save`` files whose payload
  would create a marker file are refused by ``modellego evaluate``, ``disassemble`` and
  ``assemble`` (exit 2, message on stderr, marker absent, nothing written), and the normal
  paths run with every unpickling entry point booby-trapped.
* Damaged or inconsistent model files (truncated, corrupted, manifest not matching the weights,
  unknown architecture, future format version) give a one-line error and exit 2 in every
  command. The library-level refusals are tested in tests/test_io.py.
* Disassembly (profiling) and the metrics leave no hook on any module and restore every
  submodule's train/eval flag and the grad mode, after success and after an exception raised
  inside the model, for every registered architecture.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers import run_cli
from modellego.analysis.locate import LocateConfig, profiled_layers
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.files import save_model
from modellego.io import FORMAT, load_weights, read_manifest, save_weights
from modellego.metrics import count_macs, cpu_latency_ms
from modellego.models import create_model, list_models
from modellego.surgery.graph import build_channel_graph
from modellego.training import TrainConfig, train

ARCHS = list_models()
SHAPE = (1, 28, 28)


def _assert_refused(result: tuple[int, str, str], command: str, *words: str) -> None:
    code, out, err = result
    assert code == 2, err
    assert out == ""
    assert err.startswith(f"modellego {command}: error: "), err
    assert err.count("\n") == 1, err  # one line: no traceback
    for word in words:
        assert word in err, (word, err)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained digits simnet (10 classes) and one trained on classes 5-9, as model files."""
    folder = tmp_path_factory.mktemp("good")
    files = {}
    for key, classes in (("all", None), ("high", (5, 6, 7, 8, 9))):
        model, manifest = train(TrainConfig(arch="simnet", dataset="digits", epochs=2,
                                            width=0.25, batch_size=32, classes=classes),
                                progress=False)
        files[key] = folder / f"{key}.safetensors"
        save_model(files[key], model, manifest)
    return files


# --------------------------------------------------------------------------- crafted pickles


class _Payload:
    """Unpickling an instance runs ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _craft(kind: str, folder: Path, marker: Path) -> Path:
    """A file that would create ``marker`` if anything unpickled it."""
    if kind == "torch.save":
        path = folder / "checkpoint.safetensors"  # a zip checkpoint with a safe-looking name
        torch.save({"weight": torch.zeros(3), "evil": _Payload(marker)}, path)
        return path
    name, protocol = {"pth": ("model.pth", pickle.DEFAULT_PROTOCOL),
                      "pickle-as-safetensors": ("model.safetensors", pickle.HIGHEST_PROTOCOL),
                      "protocol-0": ("model.safetensors", 0)}[kind]
    path = folder / name
    path.write_bytes(pickle.dumps(_Payload(marker), protocol=protocol))
    return path


EVIL = ["pth", "pickle-as-safetensors", "protocol-0", "torch.save"]
# what the refusal says: pickles are named as such; a protocol-0 pickle has no binary
# signature and is refused because it is no safetensors file
EVIL_WORDS = {"pth": "pickle", "pickle-as-safetensors": "pickle", "protocol-0":
              "not a valid safetensors file", "torch.save": "pickle"}


@pytest.mark.parametrize("kind", EVIL)
def test_crafted_files_really_are_dangerous(kind: str, tmp_path: Path) -> None:
    """Control: each crafted file does create the marker when it is unpickled."""
    marker = tmp_path / "marker"
    path = _craft(kind, tmp_path, marker)
    if kind == "torch.save":
        with open(path, "rb") as fh:  # a file object: torch dispatches on the suffix
            torch.load(fh, weights_only=False)
    else:
        pickle.loads(path.read_bytes()).close()
    assert marker.exists()


def _commands(evil: Path, good: dict[str, Path], out: Path) -> dict[str, list]:
    return {
        "evaluate": ["evaluate", evil, "--no-latency"],
        "disassemble": ["disassemble", evil, "--classes", "0,1", "--out", out],
        "assemble-first": ["assemble", evil, good["high"], "--out", out],
        "assemble-second": ["assemble", good["high"], evil, "--out", out, "--report",
                            out.with_suffix(".json")],
    }


@pytest.mark.parametrize("command", ["evaluate", "disassemble", "assemble-first",
                                     "assemble-second"])
@pytest.mark.parametrize("kind", EVIL)
def test_cli_refuses_crafted_pickles(kind: str, command: str, good: dict[str, Path],
                                     tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _craft(kind, tmp_path, marker)
    outdir = tmp_path / "out"
    outdir.mkdir()
    argv = _commands(evil, good, outdir / "result.safetensors")[command]
    _assert_refused(run_cli(argv), argv[0], str(evil), EVIL_WORDS[kind])
    if EVIL_WORDS[kind] == "pickle":
        err = run_cli(argv)[2]
        assert "never unpickles" in err and "safetensors" in err  # why, and what to do
    assert not marker.exists()
    assert list(outdir.iterdir()) == []


@pytest.mark.slow
def test_cli_refuses_a_crafted_pickle_in_a_real_process(tmp_path: Path) -> None:
    """The installed entry point (``python -m modellego``) exits 2 without running the payload."""
    marker = tmp_path / "marker"
    evil = _craft("pth", tmp_path, marker)
    proc = subprocess.run([sys.executable, "-m", "modellego", "evaluate", str(evil)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("modellego evaluate: error: ")
    assert "pickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every unpickling entry point fail loudly for the duration of a test."""
    def trap(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(target, name, trap)


def test_normal_use_never_unpickles(no_unpickling, good: dict[str, Path],
                                    tmp_path: Path) -> None:
    comp = tmp_path / "comp.safetensors"
    assembled = tmp_path / "assembled.safetensors"
    for argv in (["evaluate", good["all"], "--no-latency", "--json"],
                 ["disassemble", good["all"], "--classes", "0,1", "--out", comp],
                 ["evaluate", comp, "--no-latency", "--json"],
                 ["assemble", comp, good["high"], "--out", assembled, "--scaling", "logit"],
                 ["evaluate", assembled, "--no-latency", "--json"]):
        code, _, err = run_cli(argv)
        assert code == 0, (argv, err)
    with pytest.raises(AssertionError, match="unpickle"):  # the trap is armed
        pickle.loads(pickle.dumps(1))


# --------------------------------------------------------------------------- damaged files


def _damaged(kind: str, source: Path, folder: Path) -> tuple[Path, str]:
    """A damaged copy of ``source`` and a phrase the error message must contain."""
    data = source.read_bytes()
    path = folder / f"{kind}.safetensors"
    if kind == "truncated-half":
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated"
    if kind == "truncated-weights":  # the header is intact, the last tensor bytes are gone
        path.write_bytes(data[:-7])
        return path, "cannot read weights"
    if kind == "corrupted-header":
        junk = bytes((b ^ 0x5A) for b in data[8:40])
        path.write_bytes(data[:8] + junk + data[40:])
        return path, "header is not valid JSON"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "truncated"
    tensors, manifest = load_weights(source)
    manifest = {k: v for k, v in manifest.items() if k not in ("format", "format_version")}
    if kind == "no-manifest":
        save_file(tensors, str(path))
        return path, "no modellego manifest"
    if kind == "manifest-mismatch":
        manifest["architecture"]["kwargs"]["num_classes"] = 7
        save_weights(path, tensors, manifest)
        return path, "weights do not match the manifest"
    if kind == "missing-tensor":
        tensors.pop("fc.bias")
        save_weights(path, tensors, manifest)
        return path, "missing 1 tensors (e.g. fc.bias)"
    if kind == "unknown-architecture":
        manifest["architecture"]["name"] = "simnet9000"
        save_weights(path, tensors, manifest)
        return path, "unknown architecture 'simnet9000'"
    if kind == "future-version":
        manifest.update(format=FORMAT, format_version=99)
        save_file(tensors, str(path), metadata={"modellego": json.dumps(manifest)})
        return path, "format version 99 is not supported"
    raise AssertionError(kind)  # pragma: no cover


DAMAGE = ["truncated-half", "truncated-weights", "corrupted-header", "empty", "no-manifest",
          "manifest-mismatch", "missing-tensor", "unknown-architecture", "future-version"]


@pytest.mark.parametrize("command", ["evaluate", "disassemble", "assemble-second"])
@pytest.mark.parametrize("kind", DAMAGE)
def test_cli_refuses_damaged_files(kind: str, command: str, good: dict[str, Path],
                                   tmp_path: Path) -> None:
    bad, phrase = _damaged(kind, good["all"], tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    argv = _commands(bad, good, outdir / "result.safetensors")[command]
    _assert_refused(run_cli(argv), argv[0], str(bad), phrase)
    assert list(outdir.iterdir()) == []


def test_future_version_message_says_to_upgrade(good: dict[str, Path], tmp_path: Path) -> None:
    bad, _ = _damaged("future-version", good["all"], tmp_path)
    _assert_refused(run_cli(["evaluate", bad]), "evaluate", "upgrade modellego", "versions 1..")
    with pytest.raises(Exception, match="not supported"):
        read_manifest(bad)


def test_inputs_are_never_modified(good: dict[str, Path], tmp_path: Path) -> None:
    """Reading a model (and failing on another) leaves every input file byte-identical."""
    copy = tmp_path / "all.safetensors"
    shutil.copy(good["all"], copy)
    before = copy.read_bytes()
    bad, _ = _damaged("truncated-half", good["all"], tmp_path)
    bad_bytes = bad.read_bytes()
    run_cli(["evaluate", copy, "--no-latency"])
    run_cli(["assemble", copy, bad, "--out", tmp_path / "x.safetensors"])
    assert copy.read_bytes() == before and bad.read_bytes() == bad_bytes


# --------------------------------------------------------------------------- hygiene


def _scramble_modes(model: nn.Module) -> list[bool]:
    """Put the submodules in a mixed train/eval pattern; return it."""
    model.train()
    for i, mod in enumerate(model.modules()):
        mod.training = i % 3 != 1
    return [m.training for m in model.modules()]


def _assert_clean(model: nn.Module, modes: list[bool], grad: bool) -> None:
    for name, mod in model.named_modules():
        assert not mod._forward_hooks, name
        assert not mod._forward_pre_hooks, name
        assert not mod._backward_hooks, name
        assert not mod._backward_pre_hooks, name
    from torch.nn.modules import module as module_mod

    assert not module_mod._global_forward_hooks
    assert not module_mod._global_forward_pre_hooks
    assert [m.training for m in model.modules()] == modes
    assert torch.is_grad_enabled() == grad
    assert not torch.is_inference_mode_enabled()


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, in_channels=1, num_classes=10, input_size=28, width=0.25)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
    return model


@pytest.fixture(scope="module")
def noise() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, *SHAPE, generator=gen), torch.arange(16) % 2


class _Boom(RuntimeError):
    pass


@contextlib.contextmanager
def _exploding_conv(model: nn.Module, only_when_hooked: bool):
    """Make an inner conv raise: always, or only while someone else has hooked it.

    The test's own hook is removed on exit, before the model is checked for hooks.
    """
    graph = build_channel_graph(model, SHAPE)
    convs = [lay.module for lay in profiled_layers(graph) if lay.kind == "conv"]
    target = convs[len(convs) // 2]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not only_when_hooked or len(module._forward_hooks) > 1:
            raise _Boom("boom inside the model")

    handle = target.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _disassemble(model: nn.Module, noise) -> None:
    x, y = noise
    config = DisassemblyConfig((0, 1), samples_per_class=4, locate=LocateConfig(rule="mass"))
    disassemble_model(model, x, y, classes=[0, 1], output_classes=range(10), config=config)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("arch", ARCHS)
def test_disassembly_hygiene(arch: str, grad: bool, noise) -> None:
    model = _model(arch)
    modes = _scramble_modes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.set_grad_enabled(grad):
        _disassemble(model, noise)
        _assert_clean(model, modes, grad)
        # an exception while profiling (the contribution hooks are attached) ...
        with _exploding_conv(model, only_when_hooked=True):
            with pytest.raises(_Boom, match="boom"):
                _disassemble(model, noise)
        _assert_clean(model, modes, grad)
        # ... and one at the first forward pass (building the channel graph)
        with _exploding_conv(model, only_when_hooked=False):
            with pytest.raises(Exception, match="boom"):
                _disassemble(model, noise)
        _assert_clean(model, modes, grad)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # BN statistics untouched


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("arch", ARCHS)
def test_metrics_hygiene(arch: str, grad: bool) -> None:
    model = _model(arch)
    modes = _scramble_modes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.set_grad_enabled(grad):
        assert count_macs(model, SHAPE) > 0
        assert cpu_latency_ms(model, SHAPE, repeats=1, warmup=0) > 0
        _assert_clean(model, modes, grad)
        for only_when_hooked, measure in ((True, lambda: count_macs(model, SHAPE)),
                                          (False, lambda: count_macs(model, SHAPE)),
                                          (False, lambda: cpu_latency_ms(model, SHAPE,
                                                                         repeats=1, warmup=0))):
            with _exploding_conv(model, only_when_hooked):
                with pytest.raises(_Boom, match="boom"):
                    measure()
            _assert_clean(model, modes, grad)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
