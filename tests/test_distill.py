"""Tests for knowledge distillation (``modellego distill``): the loss, the training set-up
against plain training, the teacher left untouched, the student file, and bad input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import run_cli
from modellego import DisassemblyConfig, disassemble
from modellego.assembly import AssemblyConfig
from modellego.data import dataset_info, load_split
from modellego.distillation import DistillConfig, distill, kd_loss
from modellego.errors import ModelLegoError
from modellego.evaluation import evaluate
from modellego.files import load_model, save_model
from modellego.manifest import Manifest
from modellego.models import create_model, list_models
from modellego.training import TrainConfig, train
from modellego.workflows import assemble

CLASSES = (7, 3, 1)  # deliberately not sorted: the student must keep the teacher's order
SEED = 3


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory, single_thread) -> Path:
    """A simnet trained for 2 epochs on digits 7, 3, 1 (in that output order)."""
    model, manifest = train(TrainConfig(arch="simnet", dataset="digits", classes=CLASSES,
                                        epochs=2, width=0.25, batch_size=32), progress=False)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(path, model, manifest)
    return path


@pytest.fixture(scope="module")
def reference(single_thread) -> tuple[nn.Module, dict]:
    """The student architecture trained alone by ``modellego train`` with the same settings."""
    return train(TrainConfig(arch="simnet", dataset="digits", classes=CLASSES, epochs=2,
                             width=0.25, batch_size=32, seed=SEED), progress=False)


def student_config(alpha: float) -> DistillConfig:
    return DistillConfig("simnet", width=0.25, epochs=2, batch_size=32, alpha=alpha, seed=SEED)


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- the loss


def _log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(v) for v in row))
    return [v - lse for v in row]


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (2.5, 0.7), (4.0, 1.0), (3.0, 0.0)])
def test_kd_loss_matches_a_hand_computation(temperature: float, alpha: float) -> None:
    s = [[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]]
    t = [[2.0, 0.0, -1.0], [-0.5, 1.5, 0.0]]
    y = [2, 1]
    kl = 0.0
    for srow, trow in zip(s, t):
        logp = _log_softmax([v / temperature for v in trow])
        logq = _log_softmax([v / temperature for v in srow])
        kl += sum(math.exp(lp) * (lp - lq) for lp, lq in zip(logp, logq))
    kl /= len(s)
    ce = -sum(_log_softmax(srow)[c] for srow, c in zip(s, y)) / len(s)
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64),
                  torch.tensor(y), temperature=temperature, alpha=alpha)
    assert abs(got.item() - expected) < 1e-12
    same = kd_loss(torch.tensor(s), torch.tensor(s), torch.tensor(y), temperature=temperature,
                   alpha=1.0)
    assert abs(same.item()) < 1e-6  # a student equal to its teacher has nothing to learn


# --------------------------------------------------------------------------- training


def test_alpha_zero_is_plain_training(teacher_file: Path, reference) -> None:
    """alpha = 0 reproduces ``modellego train`` bit for bit, though the teacher runs on every
    batch: same initial weights, batches, augmentation and checkpoint choice."""
    teacher, manifest = load_model(teacher_file)
    student, man, report = distill(teacher, manifest, student_config(0.0), compare=True)
    ref_model, ref_manifest = reference
    ref_state = ref_model.state_dict()
    assert list(student.state_dict()) == list(ref_state)
    for key, value in student.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    assert man["provenance"]["history"] == ref_manifest["provenance"]["history"]
    acc = ref_manifest["metrics"]["test_accuracy"]
    assert report["student_kd"]["accuracy"] == acc
    assert report["student_alone"]["accuracy"] == acc


def test_distillation_changes_the_student_and_not_the_teacher(teacher_file: Path,
                                                              reference) -> None:
    teacher, manifest = load_model(teacher_file)
    teacher.train()
    teacher.fc.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    student, _, report = distill(teacher, manifest, student_config(0.9), compare=True)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(m.training for m in teacher.modules())
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.is_grad_enabled()
    ref_model = reference[0]
    assert not torch.equal(student.fc.weight, ref_model.fc.weight)
    # the reference run inside distill is plain training with the same seed
    assert report["student_alone"]["accuracy"] == reference[1]["metrics"]["test_accuracy"]
    assert report["teacher"]["accuracy"] == evaluate(teacher, manifest, latency=False)["accuracy"]


def test_a_component_teacher_gives_its_task_classes(teacher_file: Path) -> None:
    teacher, manifest = load_model(teacher_file)
    comp, comp_manifest, _ = disassemble(teacher, manifest,
                                         DisassemblyConfig((3, 7), samples_per_class=10))
    config = DistillConfig("lenet5", width=0.25, epochs=1, batch_size=64)
    student, man, report = distill(comp.model, comp_manifest, config, compare=False)
    assert man["classes"] == [3, 7] and man["class_names"] == ["3", "7"]
    assert man["provenance"]["teacher"]["kind"] == "component"
    assert man["provenance"]["teacher"]["classes"] == [3, 7]
    assert student(torch.zeros(1, 1, 28, 28)).shape == (1, 2)
    test = load_split("digits", "test")
    assert report["n"] == int(((test.labels == 3) | (test.labels == 7)).sum())
    assert report["teacher"]["accuracy"] == comp_manifest["metrics"]["test_accuracy"]
    assert "student_alone" not in report


# --------------------------------------------------------------------------- command line


@pytest.mark.slow
@pytest.mark.parametrize("arch", list_models())
def test_cli_distils_into_every_architecture(arch: str, teacher_file: Path,
                                             tmp_path: Path) -> None:
    out, rep = tmp_path / "student.safetensors", tmp_path / "report.json"
    argv = ["distill", teacher_file, "--student", arch, "--width", "0.125", "--epochs", "1",
            "--batch-size", "64", "--temperature", "3", "--alpha", "0.8", "--no-compare",
            "--quiet", "--out", out, "--report", rep]
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    model, man = load_model(out)
    report = json.loads(rep.read_text())
    assert man["kind"] == "model"
    assert man["classes"] == list(CLASSES) and man["class_names"] == ["7", "3", "1"]
    assert man["architecture"] == {"name": arch, "kwargs": {
        "in_channels": 1, "num_classes": 3, "input_size": 28, "width": 0.125}}
    prov = man["provenance"]
    assert prov["made_by"] == "modellego distill"
    assert prov["command"] == "modellego " + " ".join(str(a) for a in argv)
    assert prov["teacher"]["file"] == str(teacher_file)
    assert prov["teacher"]["sha256"] == hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    assert prov["teacher"]["classes"] == list(CLASSES)
    assert prov["config"] == DistillConfig(arch, width=0.125, epochs=1, batch_size=64,
                                           temperature=3.0, alpha=0.8).to_dict()
    assert prov["modellego_version"]
    again = evaluate(model, man, latency=False)
    assert report["student_kd"]["accuracy"] == again["accuracy"]
    assert man["metrics"]["test_accuracy"] == again["accuracy"]
    assert report["student_kd"]["params"] == again["params"]
    assert report["student_kd"]["flops"] == again["flops"]
    assert "student_alone" not in report and report["epochs"] == 1
    assert "student + KD" in stdout and "student alone" not in stdout
    assert f"{again['accuracy']:.4f}" in stdout


def _assert_refused(argv: list, words: list[str], outdir: Path) -> None:
    code, out, err = run_cli(argv)
    assert code == 2, err
    assert out == ""
    assert err.startswith("modellego distill: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    assert list(outdir.iterdir()) == []


@pytest.mark.parametrize("options,words", [
    (["--student", "nosuchnet"], ["--student", "'nosuchnet'", "lenet5"]),
    (["--alpha", "1.5"], ["--alpha", "[0, 1]", "1.5"]),
    (["--alpha", "-0.1"], ["--alpha", "[0, 1]"]),
    (["--alpha", "nan"], ["--alpha", "[0, 1]"]),
    (["--temperature", "0"], ["--temperature", "> 0"]),
    (["--temperature", "-2"], ["--temperature", "> 0"]),
    (["--epochs", "0"], ["--epochs", ">= 1"]),
    (["--width", "0"], ["--width", "> 0"]),
])
def test_cli_bad_options(options: list[str], words: list[str], teacher_file: Path,
                         outdir: Path) -> None:
    argv = ["distill", teacher_file, "--out", outdir / "s.safetensors", "--report",
            outdir / "r.json", "--quiet"]
    if "--student" not in options:
        argv += ["--student", "lenet5"]
    _assert_refused(argv + options, words, outdir)


def test_cli_refuses_an_assembly_teacher(teacher_file: Path, tmp_path: Path,
                                         outdir: Path) -> None:
    teacher, manifest = load_model(teacher_file)
    torch.manual_seed(0)
    other = create_model("simnet", in_channels=1, num_classes=2, input_size=28, width=0.25)
    other_manifest = Manifest.for_model(
        architecture={"name": "simnet", "kwargs": {"in_channels": 1, "num_classes": 2,
                                                   "input_size": 28, "width": 0.25}},
        dataset=dataset_info("digits").to_dict(), classes=(0, 2))
    model, asm_manifest, _ = assemble([(teacher, manifest), (other.eval(), other_manifest)],
                                   AssemblyConfig(scaling="none"))
    asm = tmp_path / "asm.safetensors"
    save_model(asm, model, asm_manifest)
    _assert_refused(["distill", asm, "--student", "lenet5", "--out", outdir / "s.safetensors",
                     "--quiet"], ["'assembly'", "model or a component"], outdir)
    with pytest.raises(ModelLegoError, match="'assembly'"):
        distill(model, asm_manifest, DistillConfig("lenet5"))


def test_cli_refuses_to_overwrite_the_teacher(teacher_file: Path, outdir: Path) -> None:
    digest = hashlib.sha256(teacher_file.read_bytes()).hexdigest()
    _assert_refused(["distill", teacher_file, "--student", "lenet5", "--out", teacher_file,
                     "--quiet"], ["would overwrite the input", "--force"], outdir)
    _assert_refused(["distill", teacher_file, "--student", "lenet5", "--out",
                     outdir / "s.safetensors", "--report", teacher_file, "--quiet"],
                    ["--report", "would overwrite the input"], outdir)
    assert hashlib.sha256(teacher_file.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("lr, words", [
    ("inf", "--lr must be a finite number > 0, got inf"),
    ("1e6", "training diverged: features.0.weight holds non-finite values after epoch 1 "
            "(learning rate 1000000.0); no model was written"),
])
def test_distill_that_diverges_writes_nothing(teacher_file: Path, tmp_path: Path, lr: str,
                                              words: str) -> None:
    # used to exit 0 and write a student with NaN weights
    out, report = tmp_path / "s.safetensors", tmp_path / "s.json"
    code, stdout, err = run_cli(["distill", teacher_file, "--student", "simnet", "--width",
                                 "0.25", "--epochs", "1", "--lr", lr, "--no-compare",
                                 "--quiet", "--out", out, "--report", report])
    assert (code, stdout) == (2, ""), err
    assert err.startswith("modellego distill: error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert list(tmp_path.iterdir()) == []


def test_distill_seed_out_of_range(teacher_file: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(["distill", teacher_file, "--student", "simnet", "--seed",
                            str(1 << 64), "--out", tmp_path / "s.safetensors"])
    assert code == 2 and err.count("\n") == 1, err
    assert f"--seed must be an integer from {-(1 << 63)} to {(1 << 64) - 1}" in err
