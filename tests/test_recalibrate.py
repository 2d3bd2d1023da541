"""Tests for BatchNorm re-estimation (``--recalibrate-bn``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_bn, run, run_cli
from modellego.analysis.locate import LocateConfig
from modellego.data import load_split, normalize
from modellego.disassembly import DisassemblyConfig, disassemble_model
from modellego.files import load_model
from modellego.io import read_manifest
from modellego.models import create_model
from modellego.surgery.recalibrate import recalibrate_batchnorm
from modellego.workflows import sample_calibration_images


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Dropout(0.5), nn.Flatten(), nn.Linear(3 * 5 * 5, 4),
                        nn.BatchNorm1d(4))
    return randomize_bn(net, 1).eval()


def test_statistics_are_the_average_of_batch_statistics() -> None:
    net = _net()
    x = torch.randn(10, 2, 5, 5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    names = recalibrate_batchnorm(net, x, batch_size=4)  # batches of 4, 4 and 2
    assert names == ["1", "6"]
    with torch.no_grad():
        conv_out = [net[0](x[s:s + 4]) for s in (0, 4, 8)]
        # while measuring, BN "1" normalises each batch by its own statistics (train mode)
        lin_out = [net[5](net[4](net[2](F.batch_norm(c, None, None, net[1].weight,
                                                      net[1].bias, training=True))))
                   for c in conv_out]  # dropout stays off
    for bn, batches in ((net[1], conv_out), (net[6], lin_out)):
        dims = (0, 2, 3) if batches[0].dim() == 4 else (0,)
        mean = torch.stack([b.mean(dims) for b in batches]).mean(0)
        var = torch.stack([b.var(dims, unbiased=True) for b in batches]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"1.running_mean", "1.running_var", "1.num_batches_tracked",
                       "6.running_mean", "6.running_var", "6.num_batches_tracked"}
    assert not any(m.training for m in net.modules())


def test_modes_restored_and_no_bn_is_a_no_op() -> None:
    net = _net().train()
    recalibrate_batchnorm(net, torch.randn(3, 2, 5, 5))
    assert all(m.training for m in net.modules())
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    assert recalibrate_batchnorm(plain, torch.randn(2, 1, 4, 4)) == []


def test_component_statistics_are_measured_on_the_calibration_images(digits) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = create_model("simnet", in_channels=1, num_classes=10, input_size=28, width=0.25)
    model = randomize_bn(model, 3).eval()
    calib = x[:300]
    kwargs = dict(classes=[3, 1], output_classes=range(10))
    base = DisassemblyConfig((3, 1), samples_per_class=10, locate=LocateConfig(rule="mass"))
    plain = disassemble_model(model, x, y, config=base, **kwargs)
    recal = disassemble_model(model, x, y, config=DisassemblyConfig(
        (3, 1), samples_per_class=10, locate=LocateConfig(rule="mass"), recalibrate_bn=300),
        calibration_images=calib, **kwargs)
    assert recal.plan == plain.plan
    by_hand = copy.deepcopy(plain.model)
    recalibrate_batchnorm(by_hand, calib)
    for (k, v), (k2, v2) in zip(recal.model.state_dict().items(),
                                by_hand.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not torch.equal(run(recal.model, x[:20]), run(plain.model, x[:20]))
    with pytest.raises(Exception, match="`calibration_images`"):
        disassemble_model(model, x, y, config=DisassemblyConfig((3, 1), recalibrate_bn=5),
                          **kwargs)


def test_calibration_images_come_from_every_class_of_the_model() -> None:
    split = load_split("digits", "train")
    a = sample_calibration_images(split, 400)
    assert torch.equal(a, sample_calibration_images(split, 400))  # seeded
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, normalize(split.images[order[:400]], split.info))
    assert set(split.labels[order[:400]].tolist()) == set(range(10))
    assert len(sample_calibration_images(split, 10 ** 6)) == len(split.labels)


def test_cli_records_the_option_and_refuses_negative_counts(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    code, _, err = run_cli(["train", "simnet", "--dataset", "digits", "--width", "0.25",
                            "--epochs", "1", "--quiet", "--out", src])
    assert code == 0, err
    out = tmp_path / "c.safetensors"
    code, _, err = run_cli(["disassemble", src, "--classes", "3,1", "--rule", "mass",
                            "--recalibrate-bn", "200", "--out", out])
    assert code == 0, err
    manifest = read_manifest(out)
    assert manifest["provenance"]["config"]["recalibrate_bn"] == 200
    model, _ = load_model(out)
    assert model is not None
    bad = tmp_path / "bad.safetensors"
    code, _, err = run_cli(["disassemble", src, "--classes", "3,1", "--recalibrate-bn", "-1",
                            "--out", bad])
    assert code == 2 and "--recalibrate-bn" in err and not bad.exists()
