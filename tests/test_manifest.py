"""The typed manifest: every field validated, exact round trips, bounded header reading.

Refusals are checked twice: the library's message, and through ``modellego evaluate`` (exit
status 2, one stderr line). Crafted files are written around :func:`save_weights` (which
refuses them) with ``safetensors.torch.save_file`` or raw header bytes.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import run_cli
from modellego import CompressConfig, DisassemblyConfig, compress, disassemble
from modellego import assembly as assembly_module
from modellego.assembly import AssemblyConfig
from modellego.distillation import DistillConfig, distill
from modellego.errors import ModelFileError
from modellego.files import LoadedModel, load_model, open_model, save_model
from modellego.io import MAX_HEADER_BYTES, load_weights, read_manifest, save_weights
from modellego.manifest import (
    FORMAT,
    HEADS,
    LAYOUTS_0_1,
    SCALINGS_0_1,
    ComponentPlan,
    DatasetSpec,
    Manifest,
    set_vocabulary,
    vocabulary,
)
from modellego.training import TrainConfig, train
from modellego.workflows import assemble

ROOT = Path(__file__).resolve().parent.parent
V010 = ROOT / "tests" / "data" / "v0_1_0"
FIXTURES = ("model", "component", "component-b", "assembly")


def raw_manifest(path: Path) -> dict:
    """The manifest exactly as stored, parsed with the plain ``json`` module."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["modellego"])


def write_crafted(path: Path, manifest: dict | str, tensors: dict) -> Path:
    """A file with this manifest text, bypassing every check of :func:`save_weights`."""
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    save_file(tensors, str(path), metadata={"modellego": text})
    return path


def write_header(path: Path, header: bytes, *, length: int | None = None,
                 size: int | None = None) -> Path:
    """A file of raw header bytes (length field ``length``, padded to ``size`` bytes)."""
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + b" " * 16)
    if size is not None:
        with open(path, "r+b") as fh:
            fh.truncate(size)  # sparse: no real disk use
    return path


def refused_by_cli(path: Path, *words: str) -> str:
    """``modellego evaluate path`` exits 2 with one stderr line holding ``words``."""
    code, out, err = run_cli(["evaluate", path])
    assert code == 2, (code, err)
    assert out == ""
    assert err.startswith(f"modellego evaluate: error: {path}"), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for word in words:
        assert word in err, (word, err)
    return err


def refused(path: Path, message: str, *, network: bool = False) -> None:
    """Every reader refuses ``path`` with exactly ``message`` (after the file name); with
    ``network``, the readers that build the network (the manifest alone is valid)."""
    if network:
        assert read_manifest(path) == raw_manifest(path)
    readers = (load_model, open_model) if network else (read_manifest, load_weights,
                                                         load_model, open_model)
    for fn in readers:
        with pytest.raises(ModelFileError) as exc:
            fn(path)
        assert str(exc.value) == f"{path}: {message}", fn.__name__
    refused_by_cli(path, message)


# --------------------------------------------------------------------------- 0.1.0 files


def test_fixtures_are_unchanged_and_small() -> None:
    stored = json.loads((V010 / "logits.json").read_text())
    assert sorted(stored["files"]) == sorted(f"{n}.safetensors" for n in FIXTURES)
    for name, entry in stored["files"].items():
        assert hashlib.sha256((V010 / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert sum(p.stat().st_size for p in V010.iterdir()) < 300_000


@pytest.mark.parametrize("name", FIXTURES)
def test_fixtures_of_0_1_0_load_and_give_the_stored_logits(name: str) -> None:
    stored = json.loads((V010 / "logits.json").read_text())
    entry = stored["files"][f"{name}.safetensors"]
    path = V010 / f"{name}.safetensors"
    model, manifest = load_model(path)
    assert manifest.to_dict() == raw_manifest(path)
    x = torch.rand(stored["batch"], *entry["input_shape"],
                   generator=torch.Generator().manual_seed(stored["seed"]))
    with torch.no_grad():
        logits = model(x)
    expected = torch.tensor(entry["logits"])
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_fixtures_as_typed_manifests() -> None:
    loaded = open_model(V010 / "component.safetensors")
    assert isinstance(loaded, LoadedModel)
    assert loaded.path == V010 / "component.safetensors"
    m = loaded.manifest
    assert (m.kind, m.classes, m.class_names, m.head) == ("component", (0, 1, 2),
                                                         ("0", "1", "2"), None)
    assert m.dataset == DatasetSpec("digits", tuple(str(i) for i in range(10)), (1, 28, 28),
                                    (0.305115,), (0.324408,))
    assert m.architecture.name == "simnet" and m.architecture.kwargs["num_classes"] == 10
    assert m.plan.kept("fc") == (0, 1, 2) and isinstance(m.plan, ComponentPlan)
    assert m.provenance.made_by == "modellego disassemble"
    assert m.provenance.source.sha256 == hashlib.sha256(
        (V010 / "model.safetensors").read_bytes()).hexdigest()
    asm = open_model(V010 / "assembly.safetensors").manifest
    a = asm.assembly
    assert (asm.kind, a.layout, a.scaling, len(a.parts)) == ("assembly", "parallel",
                                                             "calibrated", 2)
    assert [lab.key for lab in a.labels] == [f"digits:{c}" for c in range(5)]
    assert a.columns() == [[0, 1, 2], [0, 1]]
    assert asm.class_names == tuple(f"digits:{c}" for c in range(5))
    assert asm.metrics.get("test_accuracy") == raw_manifest(
        V010 / "assembly.safetensors")["metrics"]["test_accuracy"]
    with pytest.raises(AttributeError):
        asm.kind = "model"  # frozen


# --------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A file of every kind today's commands write, keyed by how it was made."""
    folder = tmp_path_factory.mktemp("made")
    files: dict[str, Path] = {}

    def keep(key: str, model: torch.nn.Module, manifest: dict) -> Path:
        files[key] = folder / f"{key}.safetensors"
        save_model(files[key], model, manifest)
        return files[key]

    model, manifest = train(TrainConfig(arch="simnet", dataset="digits", epochs=2,
                                        width=0.25, batch_size=32), progress=False)
    src = keep("train", model, manifest)
    comps = []
    for classes in ((0, 1, 2), (3, 4)):  # plain cuts: the union layout takes them too
        comp, man, _ = disassemble(model, manifest,
                                   DisassemblyConfig(classes, samples_per_class=10,
                                                     reconstruct=0),
                                   source_path=src)
        comps.append(keep(f"disassemble-{classes[0]}", comp.model, man))
    # the default: reconstructed, searched with a confidence bound (its provenance records both)
    comp, man, _ = disassemble(model, manifest,
                               DisassemblyConfig((5, 6), samples_per_class=10, reconstruct=100),
                               source_path=src)
    assert {"validation", "reconstruction"} <= set(man["provenance"])
    keep("disassemble-default", comp.model, man)
    for criterion, target in (("l1", 0.7), ("contribution", 0.9)):
        small, man, _ = compress(model, manifest,
                                 CompressConfig(criterion=criterion, target_flops=target,
                                                samples_per_class=10), source_path=str(src))
        keep(f"compress-{criterion}", small, man)
    student, man, _ = distill(model, manifest, DistillConfig(student="lenet5", width=0.5,
                                                             epochs=1, batch_size=64),
                              source_path=src, compare=False)
    keep("distill", student, man)
    for layout, scalings in (("parallel", SCALINGS_0_1), ("padded", ("none", "logit", "feature")),
                             ("union", ("none", "logit", "feature"))):
        for scaling in scalings:
            net, man, _ = assemble(comps, AssemblyConfig(layout=layout, scaling=scaling,
                                                      calibration_samples=10))
            keep(f"assemble-{layout}-{scaling}", net, man)
    return files


def _made_and_shipped(made: dict[str, Path]) -> list[Path]:
    shipped = sorted((ROOT / "checkpoints").glob("**/*.safetensors"))
    assert len(shipped) == 7
    return [*made.values(), *shipped, *(V010 / f"{n}.safetensors" for n in FIXTURES)]


def test_every_kind_is_made(made: dict[str, Path]) -> None:
    kinds = {key: raw_manifest(path)["kind"] for key, path in made.items()}
    assert kinds["train"] == kinds["distill"] == "model"
    assert {kinds[k] for k in kinds if k.startswith(("disassemble", "compress"))} == \
        {"component"}
    # parallel with each 0.1.0 scaling, padded and union with none, logit and feature
    assert sum(k == "assembly" for k in kinds.values()) == len(SCALINGS_0_1) + 3 + 3


def test_round_trip_is_exact_on_every_file_written_today(made: dict[str, Path]) -> None:
    for path in _made_and_shipped(made):
        raw = raw_manifest(path)
        manifest = Manifest.from_dict(raw, source=str(path))
        assert manifest.to_dict() == raw, path
        assert read_manifest(path) == raw, path
        again = Manifest.from_dict(copy.deepcopy(manifest.to_dict()), source="again")
        assert again == manifest, path


def test_one_plan_type_made_by_locating_and_read_from_files(made: dict[str, Path]) -> None:
    from modellego.surgery import plan as surgery_plan
    assert surgery_plan.ComponentPlan is ComponentPlan
    for key in ("disassemble-0", "disassemble-default", "compress-l1"):
        raw = raw_manifest(made[key])["plan"]
        typed = open_model(made[key]).manifest.plan
        assert type(typed) is ComponentPlan and typed.to_dict() == raw
        assert typed == ComponentPlan.from_dict(raw)  # checked and unchecked agree


def test_saving_a_loaded_file_writes_the_same_manifest(made: dict[str, Path],
                                                       tmp_path: Path) -> None:
    for key in ("assemble-union-none", "compress-contribution", "distill"):
        model, manifest = load_model(made[key])
        out = tmp_path / f"{key}.safetensors"
        save_model(out, model, manifest)
        assert raw_manifest(out) == raw_manifest(made[key])
        loaded = open_model(out)
        save_model(tmp_path / "typed.safetensors", loaded.model, loaded.manifest)
        assert raw_manifest(tmp_path / "typed.safetensors") == raw_manifest(made[key])


# --------------------------------------------------------------------------- refusals

MODEL = V010 / "model.safetensors"


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_weights(MODEL)[0]


def edited(tmp_path: Path, tensors: dict, edit) -> Path:
    manifest = raw_manifest(MODEL)
    edit(manifest)
    return write_crafted(tmp_path / "edited.safetensors", manifest, tensors)


MISSING = {
    "dataset": "an object {name, class_names, input_shape, mean, std}",
    "input": "an object {shape, mean, std}",
    "classes": "an array of class ids, one per output",
    "class_names": "an array of class names, one per output",
}


@pytest.mark.parametrize("field", sorted(MISSING))
def test_missing_field_is_refused(field: str, tensors: dict, tmp_path: Path) -> None:
    path = edited(tmp_path, tensors, lambda m: m.pop(field))
    refused(path, f"manifest has no {field} entry; expected {MISSING[field]}, found nothing")


def test_missing_nested_field_is_refused(tensors: dict, tmp_path: Path) -> None:
    path = edited(tmp_path, tensors, lambda m: m["dataset"].pop("std"))
    refused(path, "manifest has no dataset.std entry; expected a value, found nothing")


@pytest.mark.parametrize("where", ["class_names", "dataset.class_names"])
def test_class_name_that_is_not_a_string(where: str, tensors: dict, tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        (m["dataset"]["class_names"] if where.startswith("dataset") else m["class_names"])[3] = 7

    path = edited(tmp_path, tensors, edit)
    refused(path, f"manifest field {where}[3]: expected a non-empty string, found 7 (int)")


def test_class_names_of_the_wrong_length(tensors: dict, tmp_path: Path) -> None:
    path = edited(tmp_path, tensors, lambda m: m["class_names"].pop())
    refused(path, "manifest field class_names: expected an array of 10 entries, found "
                  "['0', '1', '2', '3', '4', '5', '6', '7', '8'] (list)")


def test_class_name_that_is_not_the_datasets(tensors: dict, tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["class_names"][2] = "seven"

    refused(edited(tmp_path, tensors, edit),
            "manifest field class_names[2]: expected '2', the name of class 2 in "
            "dataset.class_names, found 'seven' (str)")


def test_repeated_class(tensors: dict, tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["classes"][9] = 8
        m["class_names"][9] = "8"

    refused(edited(tmp_path, tensors, edit),
            "manifest field classes[9]: expected each value once, found 8 (int)")


def test_class_outside_the_dataset(tensors: dict, tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["classes"][0] = 10

    refused(edited(tmp_path, tensors, edit),
            "manifest field classes[0]: expected a class id of digits (0..9), found 10 (int)")


def test_fewer_classes_than_the_network_has_outputs(tensors: dict, tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["classes"], m["class_names"] = m["classes"][:9], m["class_names"][:9]
        del m["metrics"]["test_per_class"]["9"]

    refused(edited(tmp_path, tensors, edit),
            "manifest field classes: expected one entry per network output (10), found 9",
            network=True)


def test_more_classes_than_the_network_has_outputs(tensors: dict, tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["dataset"]["class_names"].append("ten")
        m["classes"].append(10)
        m["class_names"].append("ten")

    refused(edited(tmp_path, tensors, edit),
            "manifest field classes: expected one entry per network output (10), found 11",
            network=True)


def test_component_with_more_classes_than_its_plan_keeps(tmp_path: Path) -> None:
    comp = V010 / "component.safetensors"
    manifest = raw_manifest(comp)
    manifest["classes"].append(3)
    manifest["class_names"].append("3")
    path = write_crafted(tmp_path / "c.safetensors", manifest, load_weights(comp)[0])
    refused(path, "manifest field classes: expected one entry per network output (3), found 4",
            network=True)


def test_input_channels_the_dataset_cannot_be_converted_to(tensors: dict,
                                                            tmp_path: Path) -> None:
    # a network may read its dataset's images in another form (grey <-> colour, another
    # size, its own mean and std), but 3-channel images cannot become 2-channel ones
    def edit(m: dict) -> None:
        m["dataset"].update(input_shape=[3, 28, 28], mean=[0.5] * 3, std=[0.25] * 3)
        m["input"] = {"shape": [2, 28, 28], "mean": [0.5] * 2, "std": [0.25] * 2}

    refused(edited(tmp_path, tensors, edit),
            "manifest field input.shape: expected 3 channels as in dataset.input_shape, or 1 "
            "(images of other channel counts cannot be converted), found [2, 28, 28] (list)")


def test_input_in_another_form_than_the_dataset_is_valid(tensors: dict,
                                                         tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["input"]["mean"] = [0.5]

    path = edited(tmp_path, tensors, edit)
    assert read_manifest(path)["input"]["mean"] == [0.5]
    assert load_model(path)[1]["input"]["mean"] == [0.5]


def test_unknown_field_is_refused(tensors: dict, tmp_path: Path) -> None:
    def edit(m: dict) -> None:
        m["dataset"]["colour"] = "abc"

    refused(edited(tmp_path, tensors, edit),
            "manifest field dataset.colour is unknown (known here: name, class_names, "
            "input_shape, mean, std, fingerprint), found 'abc' (str); the file was written by "
            "a newer modellego or edited by hand")


@pytest.mark.parametrize("fingerprint,message", [
    ("abc", "dataset.fingerprint: expected a JSON object, found 'abc' (str)"),
    ({"dev": {}}, "dataset.fingerprint.dev is unknown (known here: train, val, test)"),
    ({"test": {"n": 3, "class_counts": [1] * 10, "sha256": "0" * 64}},
     "dataset.fingerprint.test.class_counts: expected counts that sum to n (3)"),
    ({"test": {"n": 10, "class_counts": [1] * 9, "sha256": "0" * 64}},
     "dataset.fingerprint.test.class_counts: expected an array of 10 entries"),
    ({"test": {"n": 10, "class_counts": [1] * 10, "sha256": "XYZ"}},
     "dataset.fingerprint.test.sha256: expected 64 lower-case hex digits, found 'XYZ'"),
])
def test_malformed_fingerprint_is_refused(tensors: dict, tmp_path: Path, fingerprint,
                                          message: str) -> None:
    def edit(m: dict) -> None:
        m["dataset"]["fingerprint"] = fingerprint

    with pytest.raises(ModelFileError) as exc:
        read_manifest(edited(tmp_path, tensors, edit))
    assert message in str(exc.value)


def test_save_refuses_classes_the_network_does_not_have(tmp_path: Path) -> None:
    model, typed = load_model(MODEL)
    manifest = typed.to_dict()
    manifest["classes"], manifest["class_names"] = manifest["classes"][:3], \
        manifest["class_names"][:3]
    del manifest["metrics"]
    out = tmp_path / "m.safetensors"
    with pytest.raises(ModelFileError) as exc:
        save_model(out, model, manifest)
    assert str(exc.value) == (f"{out} (not written): manifest field classes: expected one "
                              "entry per network output (10), found 3")
    manifest = raw_manifest(MODEL)
    manifest["class_names"][0] = ""
    with pytest.raises(ModelFileError, match=r"class_names\[0\]: expected a non-empty"):
        save_weights(out, load_weights(MODEL)[0], manifest)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- head


def _component(head: object = None) -> dict:
    manifest = raw_manifest(V010 / "component.safetensors")
    if head is not None:
        manifest["head"] = head
    return manifest


def test_component_head() -> None:
    assert HEADS == ("one-vs-rest",)
    assert Manifest.from_dict(_component(), source="c").head is None
    with_head = _component("one-vs-rest")
    m = Manifest.from_dict(with_head, source="c")
    assert m.head == "one-vs-rest" and m.to_dict() == with_head
    for bad, found in (("softmax", "'softmax' (str)"), (1, "1 (int)")):
        with pytest.raises(ModelFileError) as exc:
            Manifest.from_dict(_component(bad), source="c")
        expected = "one of one-vs-rest" if isinstance(bad, str) else "a non-empty string"
        assert str(exc.value) == f"c: manifest field head: expected {expected}, found {found}"
    on_model = {**raw_manifest(MODEL), "head": "one-vs-rest"}
    with pytest.raises(ModelFileError, match="manifest field head is unknown"):
        Manifest.from_dict(on_model, source="m")


# --------------------------------------------------------------------------- assemblies

ASM = V010 / "assembly.safetensors"


def _asm_refused(edit, message: str) -> None:
    manifest = raw_manifest(ASM)
    edit(manifest)
    with pytest.raises(ModelFileError) as exc:
        Manifest.from_dict(manifest, source="a")
    assert str(exc.value) == f"a: {message}"


def test_assembly_labels_must_be_the_parts_outputs() -> None:
    def swap(m: dict) -> None:
        m["labels"][0], m["labels"][1] = m["labels"][1], m["labels"][0]

    _asm_refused(swap, "manifest field labels[1]: expected labels in the order of the parts' "
                       "outputs (part, then part_output, increasing; the previous label is "
                       "(0, 1)), found [0, 0] (tuple)")

    def wrong_class(m: dict) -> None:
        m["labels"][4]["class"] = 9

    _asm_refused(wrong_class, "manifest field labels[4].class: expected 4, as output 1 of "
                              "parts[1], found 9 (int)")

    def no_part(m: dict) -> None:
        m["labels"][4]["part"] = 2

    _asm_refused(no_part, "manifest field labels[4].part: expected an integer in 0..1, "
                          "found 2 (int)")

    def names(m: dict) -> None:
        m["class_names"][0] = "0"

    _asm_refused(names, "manifest field class_names[0]: expected 'digits:0', found '0' (str)")


def test_assembly_layout_scaling_and_taps() -> None:
    def layout(m: dict) -> None:
        m["layout"] = "stacked"

    _asm_refused(layout, "manifest field layout: expected one of parallel, padded, union, "
                         "found 'stacked' (str)")

    def taps(m: dict) -> None:
        m["taps"] = None

    _asm_refused(taps, "manifest field taps: expected a JSON array, found None (NoneType)")

    def calib(m: dict) -> None:
        m["provenance"]["calibration"]["scaling"] = "logit"

    _asm_refused(calib, "manifest field provenance.calibration.scaling: expected "
                        "'calibrated', found 'logit' (str)")


def test_assembly_part_with_more_classes_than_its_network(tmp_path: Path) -> None:
    # scaling none: no router whose tensors would give the extra class away first
    parts = [V010 / "component.safetensors", V010 / "component-b.safetensors"]
    model, manifest, _ = assemble(parts, AssemblyConfig(scaling="none"))
    manifest = manifest.to_dict()
    manifest["parts"][1]["classes"].append(5)
    manifest["parts"][1]["class_names"].append("5")
    path = write_crafted(tmp_path / "a.safetensors",
                         {**manifest, "format": FORMAT, "format_version": 1},
                         model.state_dict())
    refused(path, "manifest field parts[1].classes: expected one class per output of the "
                  "part's network (2), found 3", network=True)


def test_value_sets_agree_with_the_assembly_package() -> None:
    # 0.1.0's names are all still registered; files may name whatever is registered now
    assert set(LAYOUTS_0_1) <= set(assembly_module.LAYOUTS)
    assert set(SCALINGS_0_1) <= set(assembly_module.SCALINGS)
    assert vocabulary("layout") == assembly_module.LAYOUTS
    assert vocabulary("scaling") == assembly_module.SCALINGS
    with pytest.raises(ValueError, match="set already"):
        set_vocabulary("scaling", lambda: ("none",))


# --------------------------------------------------------------------------- header bounds


def test_metadata_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_header(tmp_path / "m.safetensors", b'{"__metadata__": ["modellego"]}')
    refused(path, "safetensors __metadata__ must be a JSON object of strings, found list")


def test_metadata_value_that_is_not_a_string(tmp_path: Path) -> None:
    path = write_header(tmp_path / "m.safetensors",
                        b'{"__metadata__": {"modellego": {"format": "modellego.model"}}}')
    refused(path, "safetensors __metadata__ value 'modellego' must be a string, found dict")


def test_header_nested_thousands_deep(tmp_path: Path) -> None:
    deep = b'{"__metadata__": {}, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    path = write_header(tmp_path / "deep.safetensors", deep)
    refused(path, "safetensors header refused: nesting deeper than 64 levels; the file is "
                  "damaged or was crafted, do not use it")


def test_manifest_nested_thousands_deep(tensors: dict, tmp_path: Path) -> None:
    text = json.dumps(raw_manifest(MODEL))[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"
    path = write_crafted(tmp_path / "deep.safetensors", text, tensors)
    refused(path, "manifest refused: nesting deeper than 64 levels; the file is damaged or "
                  "was crafted, do not use it")


def test_brackets_inside_strings_do_not_count(tensors: dict, tmp_path: Path) -> None:
    manifest = raw_manifest(MODEL)
    manifest["provenance"]["command"] = "[" * 1000 + '"\\' + "{" * 1000
    path = write_crafted(tmp_path / "s.safetensors", manifest, tensors)
    assert read_manifest(path)["provenance"]["command"] == manifest["provenance"]["command"]


def test_integer_with_thousands_of_digits(tensors: dict, tmp_path: Path) -> None:
    text = json.dumps(raw_manifest(MODEL)).replace('"format_version": 1',
                                                   '"format_version": 1' + "0" * 5000)
    path = write_crafted(tmp_path / "big.safetensors", text, tensors)
    refused(path, "manifest refused: an integer of 5001 digits (at most 20 are accepted); "
                  "the file is damaged or was crafted, do not use it")
    header = b'{"__metadata__": {}, "n": -' + b"9" * 3000 + b"}"
    path = write_header(tmp_path / "big-header.safetensors", header)
    refused(path, "safetensors header refused: an integer of 3000 digits (at most 20 are "
                  "accepted); the file is damaged or was crafted, do not use it")


@pytest.mark.parametrize("number", ["NaN", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(number: str, tensors: dict, tmp_path: Path) -> None:
    text = json.dumps(raw_manifest(MODEL))
    text = text.replace('"test_accuracy": ', f'"test_accuracy": {number}, "_": ', 1)
    path = write_crafted(tmp_path / "nan.safetensors", text, tensors)
    why = ("the number 1e999 is out of range" if number == "1e999"
           else f"{number} (only finite numbers are accepted)")
    refused(path, f"manifest refused: {why}; the file is damaged or was crafted, do not use it")


def test_repeated_key_is_refused(tensors: dict, tmp_path: Path) -> None:
    text = json.dumps(raw_manifest(MODEL))[:-1] + ', "classes": [0]}'
    path = write_crafted(tmp_path / "dup.safetensors", text, tensors)
    refused(path, "manifest refused: the key 'classes' twice in one object; the file is "
                  "damaged or was crafted, do not use it")


def test_header_length_over_the_cap(tmp_path: Path) -> None:
    n = MAX_HEADER_BYTES + 1
    path = write_header(tmp_path / "huge.safetensors", b"{", length=n, size=n + 64)
    refused(path, f"safetensors header of {n} bytes is larger than the 16 MiB modellego "
                  "reads; the file is damaged or not a modellego model file")


def test_header_under_the_cap_is_read(tensors: dict, tmp_path: Path) -> None:
    manifest = raw_manifest(MODEL)
    manifest["provenance"]["command"] = "x" * 1_000_000
    path = write_crafted(tmp_path / "long.safetensors", manifest, tensors)
    assert read_manifest(path) == manifest


def test_format_mismatch_and_wrong_types(tensors: dict, tmp_path: Path) -> None:
    path = write_crafted(tmp_path / "f.safetensors", json.dumps([FORMAT]), tensors)
    refused(path, "manifest format is not 'modellego.model'")
    path = edited(tmp_path, tensors, lambda m: m.update(format_version=True))
    refused(path, "format version True is not supported by this modellego (reads versions "
                  "1..1); upgrade modellego")
    path = edited(tmp_path, tensors, lambda m: m["input"].update(shape=[1, 28]))
    refused(path, "manifest field input.shape: expected an array of 3 entries, found [1, 28] "
                  "(list)")
    path = edited(tmp_path, tensors, lambda m: m["dataset"].update(std=[0.0]))
    refused(path, "manifest field dataset.std[0]: expected a positive finite number, found "
                  "0.0 (float)")
    path = edited(tmp_path, tensors, lambda m: m["metrics"].update(test_accuracy=1.5))
    refused(path, "manifest field metrics.test_accuracy: expected a number in [0.0, 1.0], "
                  "found 1.5 (float)")


# --------------------------------------------------------------------------- layers


def test_manifest_module_imports_only_the_standard_library_and_errors() -> None:
    import sys

    source = (ROOT / "src" / "modellego" / "manifest.py").read_text()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or "").split(".")[0])
    local = {name for name in found if name.startswith(".")}
    assert local == {".errors"}
    assert all(name in sys.stdlib_module_names or name == "__future__"
               for name in found - local), found


# --------------------------------------------------------------------------- part mean/std


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0, "length"])
@pytest.mark.parametrize("where", ["manifest", "weights"])
def test_crafted_part_normalisation_is_refused_on_loading(where: str, value, tmp_path: Path
                                                          ) -> None:
    """An assembly's part mean/std: NaN, 0, negative or of the wrong length, in the manifest
    or in the adapter tensors of the weights, is refused as a file error (was a NaN or
    inf-laden evaluation, or an error from deep inside)."""
    assembly = V010 / "assembly.safetensors"
    tensors = dict(load_weights(assembly)[0])
    manifest = raw_manifest(assembly)
    if where == "manifest":
        for key in ("input", "dataset"):
            manifest["parts"][0][key]["std"] = [0.3, 0.3] if value == "length" else [value]
        text = json.dumps(manifest)
    else:
        text = json.dumps(manifest)
        shape = (1, 2, 1, 1) if value == "length" else (1, 1, 1, 1)
        tensors["body.adapters.0.std"] = torch.full(shape, 0.3 if value == "length" else value)
    path = write_crafted(tmp_path / "a.safetensors", text, tensors)
    for fn in (load_model, open_model):
        with pytest.raises(ModelFileError) as exc:
            fn(path)
        assert str(exc.value).startswith(f"{path}: "), str(exc.value)
    err = refused_by_cli(path)
    if where == "weights" and value in (0.0, -1.0):
        assert f"tensor body.adapters.0.std holds [{value}], but the manifest fixes it to " \
               "[0.324408]" in err, err
