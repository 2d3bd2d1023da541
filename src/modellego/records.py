"""The reports the verbs return, as frozen records: one per verb (disassemble, compress,
evaluate, assemble, distill, import), with :meth:`Record.to_dict` giving the JSON that
``--report`` writes (the same keys and values as the dictionaries of earlier releases).

Reading a record as a dict (``report["component_accuracy"]``) still works, reading
:meth:`Record.to_dict`, and is deprecated; the package itself reads the attributes.

This module imports only the standard library and :mod:`modellego.manifest`: the layers
below the verbs may use it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Sequence

from .manifest import DictReads


def plain(value: Any) -> Any:
    """``value`` as JSON data: records through :meth:`Record.to_dict`, sequences as lists,
    mappings as dicts, everything else as it is."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def json_default(value: Any) -> Any:
    """A ``json.dump`` ``default``: a record is written as its :meth:`Record.to_dict`."""
    if isinstance(value, Record):
        return value.to_dict()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@dataclass(frozen=True)
class Record(DictReads):
    """A frozen report. :meth:`to_dict` gives its JSON: each field under its name (or the
    key in :attr:`KEYS`), leaving out the fields of :attr:`OPTIONAL` that are ``None``."""

    #: fields written only when they are set
    OPTIONAL: ClassVar[tuple[str, ...]] = ()
    #: fields whose JSON key is not their name (``class_id`` is written as ``class``)
    KEYS: ClassVar[Mapping[str, str]] = {}

    def fields(self) -> dict[str, Any]:
        """The record's fields by name (not converted: nested records stay records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON data (what ``--report`` writes)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in self.OPTIONAL:
                continue
            out[self.KEYS.get(f.name, f.name)] = plain(value)
        return out

    def _dict_read(self, key: object) -> None:
        # read as a dict by code written when the verbs returned dicts (see DictReads); the
        # package itself never does it
        warnings.warn(f"reading a report as a dict ({type(self).__name__}, {key!r}) is "
                      "deprecated: use its attributes or report.to_dict()",
                      DeprecationWarning, stacklevel=3)


@dataclass(frozen=True)
class ClassRow(Record):
    """One class of a component's comparison with its source, on the test split."""

    KEYS: ClassVar[Mapping[str, str]] = {"class_id": "class"}

    class_id: int
    name: str
    n: int
    source_accuracy: float
    restricted_accuracy: float
    component_accuracy: float


@dataclass(frozen=True)
class Comparison(Record):
    """A smaller network against its source on the test images of ``classes``: accuracy
    (the source over all its classes and restricted to ``classes``), params and FLOPs."""

    classes: Sequence[int]
    n: int
    source_accuracy: float
    restricted_accuracy: float
    component_accuracy: float
    source_params: int
    component_params: int
    params_ratio: float
    source_flops: int
    component_flops: int
    flops_ratio: float
    per_class: Sequence[ClassRow]


@dataclass(frozen=True)
class DisassemblyReport(Comparison):
    """What :func:`modellego.disassemble` reports: the comparison, the time, and how the
    component was chosen (``validation``) and repaired (``reconstruction``)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("selection_pool", "profile_chunks", "validation",
                                           "reconstruction")

    profile_seconds: float
    total_seconds: float
    #: per class, the training images its profile was made on
    samples_per_class: Mapping[int, int]
    #: images per class a streamed folder's samples were picked from
    selection_pool: int | None = None
    #: the chunks of classes the profile was made in (too many classes for one)
    profile_chunks: Any = None
    validation: Mapping[str, Any] | None = None
    reconstruction: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class CompressionReport(Comparison):
    """What :func:`modellego.compress` reports: the comparison over all the classes, the
    target and the criterion."""

    criterion: str
    seconds: float
    target_flops: float | None = None
    target_params: float | None = None
    max_accuracy_drop: float | None = None
    fraction: float | None = None
    locate: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class EvaluationReport(Record):
    """What :func:`modellego.evaluate` reports about a model or component."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("restricted_accuracy", "latency_ms", "threads")

    dataset: str
    split: str
    classes: Sequence[int]
    n: int
    accuracy: float
    per_class: Mapping[str, float]
    params: int
    flops: int
    restricted_accuracy: float | None = None
    latency_ms: float | None = None
    threads: int | None = None


@dataclass(frozen=True)
class AssemblyEvaluation(Record):
    """What :func:`modellego.evaluate_assembly` reports: accuracy on the union of the
    parts' test images, Base, and how well the router routes."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("latency_ms",)

    n: int
    accuracy: float
    balanced_accuracy: float
    base: float
    base_per_class: Mapping[str, float]
    per_class: Mapping[str, float]
    params: int
    flops: int
    routing: Mapping[str, Any]
    latency_ms: float | None = None


@dataclass(frozen=True)
class AssemblyReport(Record):
    """What :func:`modellego.assemble` reports: the evaluation (when made), the router's
    calibration record and the labels."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("evaluation",)

    calibration: Mapping[str, Any]
    labels: Sequence[Mapping[str, Any]]
    evaluation: AssemblyEvaluation | None = None


@dataclass(frozen=True)
class DistillReport(Record):
    """What :func:`modellego.distill` reports: teacher, student with distillation and
    (with ``compare``) the same student trained alone."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("student_alone",)

    dataset: str
    classes: Sequence[int]
    n: int
    teacher: Mapping[str, Any]
    student_kd: Mapping[str, Any]
    epochs: int
    config: Mapping[str, Any]
    seconds: float
    student_alone: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ImportReport(Record):
    """What :func:`modellego.import_model` reports: the network imported and (when it was
    evaluated) its test accuracy."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ("test_accuracy", "n", "flops")

    architecture: str
    kwargs: Mapping[str, Any]
    dataset: str
    classes: Sequence[int]
    input: Mapping[str, Any]
    tensors: int
    params: int
    test_accuracy: float | None = None
    n: int | None = None
    flops: int | None = None


__all__ = ["AssemblyEvaluation", "AssemblyReport", "ClassRow", "Comparison",
           "CompressionReport", "DisassemblyReport", "DistillReport", "EvaluationReport",
           "ImportReport", "Record", "json_default", "plain"]
