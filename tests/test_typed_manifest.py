"""Typed manifests end to end: ``load_model`` gives the typed :class:`Manifest`; the verbs
build theirs with its constructors, which rebuild every kind of file exactly; reading a
manifest as a dict (what code written for 0.2 does) still works, with a warning, and the
package itself never does it."""

from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from modellego.errors import ModelFileError
from modellego.files import load_model, save_model
from modellego.io import read_manifest
from modellego.manifest import FORMAT, FORMAT_VERSION, ComponentPlan, Manifest, as_manifest

ROOT = Path(__file__).resolve().parents[1]
V010 = ROOT / "tests" / "data" / "v0_1_0"
SHIPPED = ROOT / "checkpoints" / "digits" / "mobilenet_v2.safetensors"
DEPRECATED = "reading a Manifest as a dict"


def _entries(data: dict) -> dict:
    """A file's manifest without the keys the constructors stamp themselves."""
    return {k: v for k, v in data.items() if k not in ("format", "format_version", "kind")}


def test_load_model_returns_the_typed_manifest_of_the_file() -> None:
    model, manifest = load_model(SHIPPED)
    assert isinstance(manifest, Manifest)
    assert manifest.to_dict() == read_manifest(SHIPPED)
    assert manifest.kind == "model" and manifest.classes == tuple(range(10))
    assert manifest.own_dataset.name == "digits"
    assert manifest.own_architecture.name == "mobilenet_v2"
    assert manifest.input.shape == (1, 28, 28)


def test_reading_it_as_a_dict_reads_its_json_with_a_deprecation_warning() -> None:
    _, manifest = load_model(SHIPPED)
    data = manifest.to_dict()
    with pytest.warns(DeprecationWarning, match=r"reading a Manifest as a dict \('classes'\)"):
        assert manifest["classes"] == data["classes"] == list(range(10))
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        assert manifest.get("dataset") == data["dataset"]
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        assert manifest.get("no such entry", 5) == 5
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        assert "provenance" in manifest and "plan" not in manifest
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        assert dict(manifest) == data
    # what it reads is a copy: the manifest cannot be changed through it
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        manifest["dataset"]["name"] = "changed"
    assert manifest.own_dataset.name == "digits"
    with pytest.raises(TypeError):
        manifest["kind"] = "component"  # type: ignore[index]


def test_the_package_reading_a_manifest_as_a_dict_fails_the_suite() -> None:
    """pyproject's filter turns the warning into an error when the caller is a module of
    the package (as the whole suite runs), and only then."""
    _, manifest = load_model(SHIPPED)
    code = compile("manifest['classes']", "<a package module>", "eval")
    with pytest.raises(DeprecationWarning, match=DEPRECATED):
        eval(code, {"__name__": "modellego.somewhere", "manifest": manifest})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        eval(code, {"__name__": "a_users_script", "manifest": manifest})
    assert [w.category for w in seen] == [DeprecationWarning]


def test_as_manifest_takes_the_dicts_of_earlier_releases() -> None:
    _, manifest = load_model(SHIPPED)
    data = manifest.to_dict()
    assert as_manifest(manifest) is manifest
    assert as_manifest(data) == manifest
    # a manifest built by hand, without the format keys, is validated as a new one
    assert as_manifest(_entries(data) | {"kind": "model"}) == manifest
    with pytest.raises(ModelFileError, match=r"manifest: format version 9 is not supported"):
        as_manifest({**data, "format_version": 9})
    with pytest.raises(ModelFileError, match=r"the part: manifest field classes\[0\]"):
        as_manifest({**data, "classes": [12] + data["classes"][1:]}, source="the part")
    with pytest.raises(ModelFileError, match="expected a Manifest or a manifest's JSON "
                                             "object, found list"):
        as_manifest([data])  # type: ignore[arg-type]


def test_the_model_constructor_rebuilds_a_shipped_file() -> None:
    data = read_manifest(SHIPPED)
    made = Manifest.for_model(architecture=data["architecture"], dataset=data["dataset"],
                              classes=data["classes"], input=data["input"],
                              metrics=data["metrics"], provenance=data["provenance"])
    assert made.router_fingerprint is None  # added by the verb that makes it:
    assert made.updated(router_fingerprint=data["router_fingerprint"]).to_dict() == data
    # without an input entry, the network reads the dataset's images as they are normalised
    bare = Manifest.for_model(architecture=data["architecture"], dataset=data["dataset"],
                              classes=(3, 1))
    assert bare.to_dict() == {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "model",
        "architecture": data["architecture"], "dataset": data["dataset"],
        "classes": [3, 1], "class_names": ["3", "1"],
        "input": {"shape": data["dataset"]["input_shape"], "mean": data["dataset"]["mean"],
                  "std": data["dataset"]["std"]}}
    with pytest.raises(ModelFileError, match=r"classes \[10\]: not class ids of the dataset"):
        Manifest.for_model(architecture=data["architecture"], dataset=data["dataset"],
                           classes=[10])


def test_the_component_constructor_rebuilds_a_file_of_0_1_0() -> None:
    """The component of 0.1.0 from its source: the plan, the input and the dataset
    fingerprint come from the source (none here: 0.1.0 wrote none)."""
    data = read_manifest(V010 / "component.safetensors")
    _, source = load_model(V010 / "model.safetensors")
    made = Manifest.for_component(
        source, ComponentPlan.from_dict(data["plan"]), dataset=data["dataset"],
        classes=data["classes"], metrics=data["metrics"], provenance=data["provenance"])
    assert made.to_dict() == data
    # cut again from the component, the plan is composed with the component's own
    _, comp = load_model(V010 / "component.safetensors")
    keep_all = ComponentPlan({name: {key: tuple(range(len(v))) for key, v in spec.items()}
                              for name, spec in comp.plan.modules.items()})
    again = Manifest.for_component(comp, keep_all, dataset=data["dataset"], classes=(0, 1, 2))
    assert again.plan == comp.plan and again.input == comp.input
    with pytest.raises(ModelFileError, match="a component is cut from a model or a "
                                             "component, not from a 'assembly'"):
        Manifest.for_component(load_model(V010 / "assembly.safetensors")[1], keep_all,
                               dataset=data["dataset"], classes=(0,))


def test_a_component_carries_its_sources_data_fingerprint() -> None:
    _, source = load_model(SHIPPED)
    assert source.own_dataset.fingerprint is not None
    plan = ComponentPlan({"features.0.0": {"out": (0, 1)}})
    made = Manifest.for_component(source, plan, dataset={
        k: v for k, v in source.own_dataset.to_dict().items() if k != "fingerprint"},
        classes=(0, 1))
    assert made.own_dataset.fingerprint == source.own_dataset.fingerprint
    assert made.classes == (0, 1) and made.class_names == ("0", "1")


def test_the_assembly_constructor_rebuilds_a_file_of_0_1_0() -> None:
    data = read_manifest(V010 / "assembly.safetensors")
    made = Manifest.for_assembly(
        layout=data["layout"], scaling=data["scaling"], parts=data["parts"],
        labels=data["labels"], input=data["input"], taps=data["taps"], union=data["union"],
        base=data["base"], metrics=data["metrics"], provenance=data["provenance"])
    assert made.to_dict() == data


def test_updated_sets_and_removes_entries_and_validates_again() -> None:
    _, manifest = load_model(SHIPPED)
    new = manifest.updated(metrics={"test_accuracy": 0.5}, provenance=None)
    assert new.metrics is not None and new.metrics.to_dict() == {"test_accuracy": 0.5}
    assert new.provenance is None and "provenance" not in new.to_dict()
    assert manifest.metrics is not None and manifest.metrics.get("test_accuracy") != 0.5
    with pytest.raises(ModelFileError, match=r"metrics.test_accuracy: expected a number "
                                             r"in \[0.0, 1.0\]"):
        manifest.updated(metrics={"test_accuracy": 2.0})


def test_it_copies_and_pickles() -> None:
    _, manifest = load_model(V010 / "assembly.safetensors")
    assert copy.deepcopy(manifest) is manifest  # immutable
    assert pickle.loads(pickle.dumps(manifest)) == manifest


def test_the_typed_manifest_and_its_dict_write_the_same_bytes(tmp_path: Path) -> None:
    model, manifest = load_model(V010 / "component.safetensors")
    save_model(tmp_path / "typed.safetensors", model, manifest)
    save_model(tmp_path / "dict.safetensors", model, manifest.to_dict())
    assert (tmp_path / "typed.safetensors").read_bytes() == \
        (tmp_path / "dict.safetensors").read_bytes()
    again, back = load_model(tmp_path / "typed.safetensors")
    # (save_model stores the source's path relative to the new file's folder)
    assert back.updated(provenance=None) == manifest.updated(provenance=None)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_an_assembly_part_holds_its_entry_typed(tmp_path: Path) -> None:
    """Part.of records the part's entry as a PartSpec (what the assembly's manifest
    writes, as JSON by to_dict()); a part given its JSON entry validates it; reading a part
    as a dict warns as a manifest does, and inside the package is an error."""
    from modellego.assembly.parts import Part
    from modellego.manifest import PartSpec

    model, manifest = load_model(SHIPPED)
    path = tmp_path / "m.safetensors"
    save_model(path, model, manifest)
    part = Part.of(model, manifest, path=path)
    assert isinstance(part.entry, PartSpec)
    assert part.entry.classes == tuple(range(10)) and part.entry.dataset.name == "digits"
    assert part.entry.input.shape == (1, 28, 28) and part.num_outputs == 10
    assert part.entry.file == str(path) and part.entry.sha256 is not None
    data = part.to_dict()
    assert data == {**{k: manifest.to_dict()[k] for k in
                       ("kind", "architecture", "dataset", "classes", "class_names", "input")},
                    "file": str(path), "sha256": part.entry.sha256}
    # the assembly of 0.1.0's parts, given as JSON, are the same records
    parts = read_manifest(V010 / "assembly.safetensors")["parts"]
    again = [Part(model, p) for p in parts]
    assert [p.to_dict() for p in again] == parts
    assert all(isinstance(p.entry, PartSpec) for p in again)
    with pytest.raises(ModelFileError, match=r"^a part's entry: manifest has no part\.kind"):
        Part(model, {k: v for k, v in parts[0].items() if k != "kind"})
    with pytest.warns(DeprecationWarning, match=r"reading a Part as a dict \('classes'\)"):
        assert part["classes"] == list(range(10))
    code = compile("part['classes']", "<a package module>", "eval")
    with pytest.raises(DeprecationWarning, match="reading a Part as a dict"):
        eval(code, {"__name__": "modellego.somewhere", "part": part})
