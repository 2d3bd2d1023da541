"""Router fingerprints: what they hold (against independent computations), the file round
trip and its checks, data-free assembly reading no dataset, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.covariance import LedoitWolf
from torch import nn

from helpers import run, run_cli
from modellego.assembly import AssemblyConfig, evaluate_assembly
from modellego.assembly.fingerprint import (
    fingerprint_model,
    fingerprint_taps,
    make_fingerprint,
    route_scores,
)
from modellego.data import readers, registry
from modellego.errors import ModelFileError, ModelLegoError
from modellego.files import load_model, open_model, save_model
from modellego.io import read_manifest
from modellego.manifest import ROUTER_FINGERPRINT_PREFIX
from modellego.training import TrainConfig, train
from modellego.workflows import assemble


class TwoLayer(nn.Module):
    """A linear 'network' whose second layer reads 3 features: its fingerprint taps that one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 3)
        self.second = nn.Linear(3, 2)

    def forward(self, x):
        return self.second(self.first(x))


def _independent(f: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray):
    """Class means, LW precision and the held-out log min distances, in numpy."""
    means = np.stack([f[fit][y[fit] == c].mean(0) for c in range(2)])
    centred = f[fit] - means[y[fit]]
    prec = LedoitWolf(assume_centered=True).fit(centred).precision_
    diff = f[held][:, None, :] - means[None]
    d = np.einsum("ncd,de,nce->nc", diff, prec, diff).min(1)
    return means, prec, np.log(d)


def test_fingerprint_taps_pass_over_layers_a_file_may_not_hold():
    """A tap whose layer reads more than MAX_FINGERPRINT_DIM features (its precision matrix
    would not fit a file's bounds; a ViT-H's MLP reads 5120) is passed over; where none of the
    chosen half is narrow enough, the first narrow layer is taken; with none, a refusal."""
    from torch import nn

    from modellego.manifest import MAX_FINGERPRINT_DIM

    wide = MAX_FINGERPRINT_DIM + 1
    net = nn.Sequential(nn.Linear(4, wide), nn.Linear(wide, 6), nn.Linear(6, 3)).eval()
    assert fingerprint_taps(net) == ["2"]  # the half after the first is ["1"], too wide
    x = torch.randn(40, 4)
    meta, _ = make_fingerprint(net, x, torch.arange(40) % 3)
    assert meta["taps"] == ["2"] and meta["dims"] == [6]
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, wide), nn.Linear(wide, 6),
                        nn.Linear(6, 3)).eval()
    assert fingerprint_taps(net) == ["1"]  # of ["1", "2"]: "2" reads too much
    net = nn.Sequential(nn.Linear(wide, 3)).eval()
    with pytest.raises(ModelLegoError, match=f"each of 1 spread over its depth reads more "
                                             f"than {MAX_FINGERPRINT_DIM} features"):
        fingerprint_taps(net)


def test_fingerprint_holds_gaussians_and_own_score_distribution():
    torch.manual_seed(0)
    net = TwoLayer().eval()
    assert fingerprint_taps(net) == ["second"]  # of [first, second]: the half after the first
    x = torch.randn(40, 4)
    y = torch.arange(40) % 2
    meta, tensors = make_fingerprint(net, x, y, seed=3)
    assert meta == {"version": 1, "taps": ["second"], "dims": [3], "images": 40, "seed": 3}
    # the halves: every class split in two by one seeded permutation
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    per = [perm[y[perm] == c] for c in range(2)]
    fit = torch.cat([p[::2] for p in per]).numpy()
    held = torch.cat([p[1::2] for p in per]).numpy()
    with torch.no_grad():
        f = net.first(x).double().numpy()
    means, prec, log_d = _independent(f, y.numpy(), fit, held)
    assert torch.allclose(tensors["means0"].double(), torch.from_numpy(means), atol=1e-6)
    assert torch.allclose(tensors["precision0"].double(), torch.from_numpy(prec), atol=1e-4)
    stats = tensors["tap_stats"].double()
    assert stats[0, 0] == pytest.approx(log_d.mean(), abs=1e-5)
    assert stats[1, 0] == pytest.approx(log_d.std(ddof=1), abs=1e-5)
    z = (log_d - log_d.mean()) / log_d.std(ddof=1)
    assert tensors["score_stats"].tolist() == pytest.approx([z.mean(), z.std(ddof=1)],
                                                            abs=1e-5)


def test_route_score_is_the_log_upper_tail_of_the_own_distribution():
    means = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    precision = torch.tensor([[1.0, 0.0], [0.0, 0.25]])
    tensors = {"means0": means, "precision0": precision,
               "tap_stats": torch.tensor([[0.5], [2.0]]), "score_stats": torch.tensor([0.1, 0.8])}
    f = torch.tensor([[1.0, 2.0], [3.0, 0.0], [10.0, -4.0]])
    # squared distances to the nearest mean, by hand: min(1 + 1, 9 + 1) = 2; min(9, 1) = 1;
    # min(100 + 4, 36 + 4) = 40
    d = np.array([2.0, 1.0, 40.0])
    z = (np.log(d) - 0.5) / 2.0
    expected = norm.logsf((z - 0.1) / 0.8)
    assert route_scores([f], tensors).numpy() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- parts


def _train(classes, dataset="digits"):
    config = TrainConfig(arch="simnet", dataset=dataset, epochs=3, width=0.25,
                         classes=classes, batch_size=32)
    return train(config, progress=False, fingerprint=False)


@pytest.fixture(scope="module")
def parts(single_thread, tmp_path_factory):
    """Digits 0-4, digits 5-9 and Fashion-MNIST 0-2 simnets, each saved with its fingerprint
    and without."""
    folder = tmp_path_factory.mktemp("fp")
    out = []
    for name, classes, dataset in (("a", (0, 1, 2, 3, 4), "digits"),
                                   ("b", (5, 6, 7, 8, 9), "digits"),
                                   ("f", (0, 1, 2), "fashion-mnist")):
        net, man = _train(classes, dataset)
        fp_man, tensors = fingerprint_model(net, man, per_class=100)
        save_model(folder / f"{name}.safetensors", net, fp_man, fingerprint=tensors)
        save_model(folder / f"{name}-plain.safetensors", net, man)
        out.append((net, man, fp_man, tensors, folder / f"{name}.safetensors",
                    folder / f"{name}-plain.safetensors"))
    return out


def test_fingerprint_round_trip(parts):
    net, man, fp_man, tensors, path, plain = parts[0]
    loaded = open_model(path)
    assert loaded.fingerprint is not None and set(loaded.fingerprint) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded.fingerprint[k], v.float())
    assert loaded.manifest.router_fingerprint.to_dict() == fp_man["router_fingerprint"]
    assert read_manifest(path)["router_fingerprint"]["images"] == 500  # 100 per class
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(run(loaded.model, x), run(net, x))
    assert open_model(plain).fingerprint is None
    size = sum(v.numel() for v in tensors.values()) * 4
    assert 0 < size < 4 * 2 ** 20  # "a few MB at most"


def test_fingerprint_tensors_must_match_the_manifest(parts, tmp_path):
    net, man, fp_man, tensors, _, _ = parts[0]
    with pytest.raises(ModelFileError, match="give both or neither"):
        save_model(tmp_path / "x.safetensors", net, fp_man)
    with pytest.raises(ModelFileError, match="give both or neither"):
        save_model(tmp_path / "x.safetensors", net, man, fingerprint=tensors)
    wrong = dict(tensors, means0=tensors["means0"][:, :1])
    with pytest.raises(ModelFileError, match="router fingerprint tensors do not match"):
        save_model(tmp_path / "x.safetensors", net, fp_man, fingerprint=wrong)
    assert not (tmp_path / "x.safetensors").exists()
    # a file with fingerprint tensors its manifest does not describe is refused on reading
    from modellego.io import save_weights

    state = dict(net.state_dict())
    state[ROUTER_FINGERPRINT_PREFIX + "means0"] = tensors["means0"]
    save_weights(tmp_path / "odd.safetensors", state, man)
    with pytest.raises(ModelFileError, match="unexpected tensors"):
        open_model(tmp_path / "odd.safetensors")
    state = dict(net.state_dict())
    state.update({ROUTER_FINGERPRINT_PREFIX + k: v for k, v in tensors.items()})
    state[ROUTER_FINGERPRINT_PREFIX + "tap_stats"] = torch.full_like(tensors["tap_stats"],
                                                                     float("nan"))
    save_weights(tmp_path / "nan.safetensors", state, fp_man)
    with pytest.raises(ModelFileError, match="router fingerprint tensor tap_stats contains NaN"):
        open_model(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("field, value, message", [
    ("version", lambda v: 2, "upgrade modellego"),
    ("dims", lambda v: [5000] + v[1:], r"\[0\]: expected an integer in 1..4096"),
    ("dims", lambda v: v + [3], "an array of"),
    ("taps", lambda v: [], "a non-empty array"),
    ("images", lambda v: 1, "an integer >= 2"),
])
def test_fingerprint_manifest_is_validated(parts, tmp_path, field, value, message):
    net, _, fp_man, tensors, _, _ = parts[0]
    bad = fp_man.to_dict()
    bad["router_fingerprint"][field] = value(bad["router_fingerprint"][field])
    with pytest.raises(ModelFileError, match=f"router_fingerprint.{field}.*{message}"):
        save_model(tmp_path / "x.safetensors", net, bad, fingerprint=tensors)


def _no_datasets(monkeypatch):
    """Every way modellego reads a dataset raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was read")

    for mod, names in ((registry, ("_get_loaded", "_resolve", "dataset_info")),
                       (readers, ("read_idx_pair", "read_cifar_file", "load_digits_arrays",
                                  "read_bytes"))):
        for name in names:
            monkeypatch.setattr(mod, name, refuse)
    registry.clear_cache()


def test_data_free_assembly_reads_no_dataset(parts, tmp_path, monkeypatch):
    files = [p[4] for p in parts]
    with monkeypatch.context() as m:
        _no_datasets(m)
        with pytest.raises(AssertionError, match="a dataset was read"):  # the guard holds
            assemble(files, AssemblyConfig(scaling="joint", calibration_samples=5),
                     evaluate=False)
        model, man, _ = assemble(files, AssemblyConfig(scaling="fingerprint"), evaluate=False)
        save_model(tmp_path / "free.safetensors", model, man)
    assert man["scaling"] == "fingerprint" and man["base"] is None
    assert man["taps"] == [p[2]["router_fingerprint"]["taps"] for p in parts]
    calib = man["provenance"]["calibration"]
    assert calib["data_free"] is True and calib["fingerprint_images"] == [500, 500, 300]
    # the routers hold the fingerprints exactly, and the file gives the same outputs
    for router, p in zip(model.routers, parts):
        for name, buf in router.named_buffers():
            assert torch.equal(buf, p[3][name].float())
    again, _ = load_model(tmp_path / "free.safetensors")
    x = torch.rand(6, 1, 28, 28)
    assert torch.equal(run(again, x), run(model, x))
    ev = evaluate_assembly(model, man)
    # digits vs Fashion-MNIST: the fingerprints tell them apart
    assert ev["routing"]["auroc_pairs"]["0-2"] > 0.95
    assert ev["routing"]["auroc_pairs"]["1-2"] > 0.95


def test_data_free_needs_every_part_fingerprinted(parts):
    with pytest.raises(ModelLegoError, match=r"a-plain.safetensors carries no router "
                                             r"fingerprint.*modellego fingerprint"):
        assemble([parts[0][5], parts[1][4]], AssemblyConfig(scaling="fingerprint"))


def test_cli_fingerprint_and_data_free(parts, tmp_path):
    plain_a, plain_f = parts[0][5], parts[2][5]
    code, out, err = run_cli(["fingerprint", str(plain_a), "--out", str(tmp_path / "a.st"),
                              "--images-per-class", "20"])
    assert code == 0, err
    assert "router fingerprint from 100 training images at" in out
    assert read_manifest(tmp_path / "a.st")["router_fingerprint"]["images"] == 100
    code, out, err = run_cli(["fingerprint", str(plain_f), "--out", str(tmp_path / "f.st")])
    assert code == 0, err
    code, out, err = run_cli(["assemble", str(tmp_path / "a.st"), str(tmp_path / "f.st"),
                              "--data-free", "--out", str(tmp_path / "af.st")])
    assert code == 0, err
    assert "scaling fingerprint" in out and "routing accuracy" in out
    assert read_manifest(tmp_path / "af.st")["scaling"] == "fingerprint"
    # refusals: one line, exit 2, nothing written
    code, _, err = run_cli(["assemble", str(tmp_path / "a.st"), str(plain_f), "--data-free",
                            "--out", str(tmp_path / "no.st")])
    assert code == 2 and "carries no router fingerprint" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(["assemble", str(tmp_path / "a.st"), str(tmp_path / "f.st"),
                            "--data-free", "--scaling", "joint", "--out",
                            str(tmp_path / "no.st")])
    assert code == 2 and "drop --scaling joint or --data-free" in err
    code, _, err = run_cli(["fingerprint", str(tmp_path / "af.st"), "--out",
                            str(tmp_path / "no.st")])
    assert code == 2 and "an assembly has no fingerprint of its own" in err
    code, _, err = run_cli(["fingerprint", str(plain_a), "--out", str(tmp_path / "no.st"),
                            "--images-per-class", "1"])
    assert code == 2 and "--images-per-class must be at least 2" in err
    assert not (tmp_path / "no.st").exists()


def test_commands_that_write_models_write_fingerprints(tmp_path):
    code, _, err = run_cli(["train", "simnet", "--dataset", "digits", "--epochs", "1",
                            "--width", "0.25", "--classes", "0-2", "--out",
                            str(tmp_path / "t.st"), "--quiet"])
    assert code == 0, err
    fp = read_manifest(tmp_path / "t.st")["router_fingerprint"]
    assert fp["images"] == sum(min(1000, n) for n in _train_counts((0, 1, 2)))
    code, _, err = run_cli(["disassemble", str(tmp_path / "t.st"), "--classes", "0,1",
                            "--out", str(tmp_path / "c.st"), "--samples-per-class", "10"])
    assert code == 0, err
    comp = read_manifest(tmp_path / "c.st")
    assert comp["kind"] == "component" and comp["router_fingerprint"]["taps"] == \
        fingerprint_taps(load_model(tmp_path / "c.st")[0])
    code, _, err = run_cli(["disassemble", str(tmp_path / "t.st"), "--classes", "0,1",
                            "--out", str(tmp_path / "n.st"), "--samples-per-class", "10",
                            "--no-fingerprint"])
    assert code == 0, err
    assert "router_fingerprint" not in read_manifest(tmp_path / "n.st")
    assert json.dumps(read_manifest(tmp_path / "n.st"))  # still a valid manifest


def _train_counts(classes):
    split = registry.load_split("digits", "train")
    return [int((split.labels == c).sum()) for c in classes]


def test_import_writes_a_fingerprint_unless_it_reads_no_data(tmp_path):
    from modellego.models import create_model

    torch.save(create_model("lenet5", in_channels=1, num_classes=10, input_size=28)
               .state_dict(), tmp_path / "lenet.pt")
    base = ["import", "lenet5", "--weights", tmp_path / "lenet.pt", "--dataset", "digits"]
    code, _, err = run_cli([*base, "--out", tmp_path / "m.st"])
    assert code == 0, err
    fp = read_manifest(tmp_path / "m.st")["router_fingerprint"]
    assert fp["images"] == sum(_train_counts(range(10)))  # fewer than 1000 of every digit
    assert open_model(tmp_path / "m.st").fingerprint["means0"].shape == (10, fp["dims"][0])
    code, _, err = run_cli([*base, "--out", tmp_path / "n.st", "--no-evaluate"])
    assert code == 0, err
    assert "router_fingerprint" not in read_manifest(tmp_path / "n.st")
