"""The verbs' reports are frozen records whose ``to_dict()`` is the JSON ``--report`` writes
(the keys and values of the dictionaries the verbs returned before); reading one as a dict
still works, with a deprecation warning."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import modellego as ml
from modellego.metrics import count_flops
from modellego.records import (
    AssemblyEvaluation,
    AssemblyReport,
    ClassRow,
    Comparison,
    CompressionReport,
    DisassemblyReport,
    EvaluationReport,
    json_default,
    plain,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "checkpoints" / "digits" / "mobilenet_v2.safetensors"
ROW = ClassRow(3, "three", 10, 0.9, 0.95, 0.85)
COMPARED = Comparison([3], 10, 0.9, 0.95, 0.85, 100, 40, 0.4, 1000, 300, 0.3, [ROW])


def test_a_row_is_written_with_the_class_key() -> None:
    assert ROW.to_dict() == {"class": 3, "name": "three", "n": 10, "source_accuracy": 0.9,
                             "restricted_accuracy": 0.95, "component_accuracy": 0.85}


def test_optional_entries_are_left_out_only_when_unset() -> None:
    report = DisassemblyReport(**COMPARED.fields(), profile_seconds=1.5, total_seconds=2.0,
                               samples_per_class={3: 50})
    data = report.to_dict()
    assert data == {**COMPARED.to_dict(), "profile_seconds": 1.5, "total_seconds": 2.0,
                    "samples_per_class": {3: 50}}
    assert data["per_class"] == [ROW.to_dict()]
    full = dataclasses.replace(report, selection_pool=8, profile_chunks=[[0, 1]],
                               validation={"chosen": "x"}, reconstruction={"images": 5})
    assert set(full.to_dict()) - set(data) == {"selection_pool", "profile_chunks",
                                               "validation", "reconstruction"}
    # a compression report writes its unset targets as null, as it always did
    compressed = CompressionReport(**COMPARED.fields(), criterion="l1", seconds=1.0,
                                   target_flops=0.5).to_dict()
    assert compressed["target_params"] is None and compressed["locate"] is None
    assert compressed["fraction"] is None and compressed["criterion"] == "l1"


def test_nested_records_and_json() -> None:
    evaluation = AssemblyEvaluation(4, 0.5, 0.5, 0.75, {"d:0": 1.0}, {"d:0": 0.5}, 10, 20,
                                    {"routing_accuracy": 0.5})
    report = AssemblyReport({"scaling": "none"}, [{"dataset": "d"}], evaluation)
    assert report.to_dict()["evaluation"] == evaluation.to_dict()
    assert "latency_ms" not in evaluation.to_dict()
    assert "evaluation" not in AssemblyReport({}, []).to_dict()
    text = json.dumps({"report": report}, default=json_default, sort_keys=True)
    assert json.loads(text) == {"report": plain(report)}
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        json.dumps(object(), default=json_default)


def test_records_are_frozen_and_read_as_dicts_with_a_warning() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ROW.n = 3  # type: ignore[misc]
    with pytest.warns(DeprecationWarning, match=r"reading a report as a dict "
                                                r"\(Comparison, 'flops_ratio'\)"):
        assert COMPARED["flops_ratio"] == 0.3
    with pytest.warns(DeprecationWarning, match="reading a report as a dict"):
        assert COMPARED.get("nothing", 7) == 7
    with pytest.warns(DeprecationWarning, match="reading a report as a dict"):
        assert "per_class" in COMPARED
    with pytest.warns(DeprecationWarning, match="reading a report as a dict"):
        assert dict(COMPARED) == COMPARED.to_dict()


@pytest.mark.slow
def test_the_verbs_return_their_records(tmp_path: Path) -> None:
    model, manifest = ml.load_model(DIGITS)
    evaluated = ml.evaluate(model, manifest, classes=[0, 1], latency=False)
    assert isinstance(evaluated, EvaluationReport)
    assert set(evaluated.to_dict()) == {"dataset", "split", "classes", "n", "accuracy",
                                        "per_class", "params", "flops",
                                        "restricted_accuracy"}
    comp, comp_manifest, report = ml.disassemble(
        model, manifest, ml.DisassemblyConfig.paper((0, 1)), fingerprint=False)
    assert isinstance(report, DisassemblyReport)
    assert [r.class_id for r in report.per_class] == [0, 1]
    assert report.component_flops == count_flops(comp.model, (1, 28, 28))
    assert comp_manifest.metrics is not None
    assert comp_manifest.metrics.get("test_accuracy") == report.component_accuracy
    small, _, compressed = ml.compress(model, manifest, ml.CompressConfig("l1", 0.5),
                                       fingerprint=False)
    assert isinstance(compressed, CompressionReport)
    assert compressed.classes == list(range(10)) and compressed.criterion == "l1"
    ml.save_model(tmp_path / "c.safetensors", comp.model, comp_manifest)
    ml.save_model(tmp_path / "s.safetensors", small, _)
    asm, _, assembled = ml.assemble([tmp_path / "s.safetensors", tmp_path / "c.safetensors"],
                                    ml.AssemblyConfig(scaling="none",
                                                      on_duplicate="replace"))
    assert isinstance(assembled, AssemblyReport)
    assert isinstance(assembled.evaluation, AssemblyEvaluation)
    assert assembled.to_dict()["evaluation"] == assembled.evaluation.to_dict()
    # the component's classes 0 and 1 replace the compressed model's
    assert [(lab["class"], lab["part"]) for lab in assembled.labels] == \
        [(c, 0) for c in range(2, 10)] + [(0, 1), (1, 1)]
