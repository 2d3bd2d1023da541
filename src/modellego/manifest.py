"""The typed, validated manifest of a model file.

A model file's manifest (JSON in the safetensors header, see :mod:`modellego.io`) is read
into a :class:`Manifest` by :meth:`Manifest.from_dict`, which checks every field: types,
ranges, and that lengths and values agree with each other (one class name per class, the
class names those of the dataset, labels that point at real outputs of the parts, ...).
:meth:`Manifest.to_dict` writes exactly the JSON object that modellego 0.1.0 wrote, so
``Manifest.from_dict(d, source=...).to_dict() == d`` for every file it made.

Anything wrong raises :class:`~modellego.errors.ModelFileError` naming the file, the field
(a path such as ``dataset.class_names[3]``), what was expected and what was found.

This module knows the *shape* of each kind of file (``model``, ``component``,
``assembly``), not how to build their networks: it imports only the standard library and
:mod:`modellego.errors`. Free-form data (architecture arguments, provenance, metrics) is kept
as read-only JSON: mappings become :class:`types.MappingProxyType`, arrays tuples.

>>> from modellego.io import read_manifest
>>> path = "checkpoints/fashion-mnist/vgg16_bn-classes5-9.safetensors"
>>> m = Manifest.from_dict(read_manifest(path), source=path)
>>> m.kind, m.classes, m.dataset.name
('model', (5, 6, 7, 8, 9), 'fashion-mnist')
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, NoReturn

from .errors import ModelFileError, PlanError

FORMAT = "modellego.model"
FORMAT_VERSION = 1
#: the kinds of model file
KINDS = ("model", "component", "assembly")
#: the output heads a component may declare (absent: an ordinary softmax classifier)
HEADS = ("one-vs-rest",)
#: the assembly layouts and scalings of modellego 0.1.0: what a file may name until the
#: package, when it is assembled, hands over its registries (see :func:`set_vocabulary`)
LAYOUTS_0_1 = ("parallel", "padded", "union")
SCALINGS_0_1 = ("none", "logit", "feature", "calibrated")
#: the scalings whose routers read the parts' tapped features (the file lists the taps)
FEATURE_SCALINGS = ("calibrated", "joint", "fingerprint")
_VOCABULARY: dict[str, Callable[[], Sequence[str]]] = {}
_DEFAULT_VOCABULARY = {"layout": LAYOUTS_0_1, "scaling": SCALINGS_0_1}


def set_vocabulary(field: str, names: Callable[[], Sequence[str]]) -> None:
    """Let ``field`` (``"layout"`` or ``"scaling"``) take the names ``names()`` returns: the
    package passes its registries' ``names`` here, so a new layout or scaling is one
    registration, and this module needs no import of the layers that define them."""
    if field not in _DEFAULT_VOCABULARY:
        raise ValueError(f"no vocabulary {field!r}; known: {', '.join(_DEFAULT_VOCABULARY)}")
    if field in _VOCABULARY:
        raise ValueError(f"the vocabulary of {field!r} is set already")
    _VOCABULARY[field] = names


def vocabulary(field: str) -> tuple[str, ...]:
    """The names a file may use for ``field`` (``"layout"`` or ``"scaling"``)."""
    names = _VOCABULARY.get(field)
    return tuple(names()) if names is not None else _DEFAULT_VOCABULARY[field]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_MISSING = object()
_SINGLE_KEYS = ("kind", "architecture", "dataset", "classes", "class_names", "input",
                "metrics", "provenance", "format", "format_version", "router_fingerprint")
_KEYS = {
    "model": _SINGLE_KEYS,
    "component": _SINGLE_KEYS + ("plan", "head"),
    "assembly": ("kind", "layout", "scaling", "parts", "taps", "union", "base", "labels",
                 "classes", "class_names", "input", "metrics", "provenance", "format",
                 "format_version"),
}
_EXPECTED = {
    "dataset": "an object {name, class_names, input_shape, mean, std}",
    "input": "an object {shape, mean, std}",
    "classes": "an array of class ids, one per output",
    "class_names": "an array of class names, one per output",
    "class": "a class id", "name": "a non-empty string", "part": "a part index",
    "part_output": "an output index of the part", "parts": "an array of parts",
    "layout": "an assembly layout's name", "scaling": "a scaling's name",
    "labels": "an array of labels", "plan": "an object of layers",
}
_PART_KEYS = ("kind", "architecture", "plan", "head", "dataset", "classes", "class_names",
              "input", "file", "sha256", "source")


# --------------------------------------------------------------------------- checking


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    text = repr(_thaw(value))
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


class _Check:
    """Field checks that raise :class:`ModelFileError` naming ``source`` and the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, expected: str, found: Any) -> NoReturn:
        if found is _MISSING:
            raise ModelFileError(f"{self.source}: manifest has no {path} entry; expected "
                                 f"{expected}, found nothing")
        raise ModelFileError(f"{self.source}: manifest field {path}: expected {expected}, "
                             f"found {_show(found)}")

    def obj(self, value: Any, path: str, keys: Sequence[str], required: Sequence[str]
            ) -> Mapping[str, Any]:
        """``value`` as a mapping with ``required`` keys and no keys outside ``keys``."""
        if not isinstance(value, Mapping):
            self.fail(path, "a JSON object", value)
        for key in value:
            if key not in keys:
                raise ModelFileError(
                    f"{self.source}: manifest field {f'{path}.{key}' if path else key} is "
                    f"unknown (known here: {', '.join(keys)}), found {_show(value[key])}; "
                    "the file was written by a newer modellego or edited by hand")
        for key in required:
            if key not in value:
                self.fail(f"{path}.{key}" if path else key, _EXPECTED.get(key, "a value"),
                          _MISSING)
        return value

    def string(self, value: Any, path: str, *, choices: Sequence[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, "a non-empty string", value)
        if choices is not None and value not in choices:
            self.fail(path, f"one of {', '.join(choices)}", value)
        return value

    def opt_string(self, value: Any, path: str) -> str | None:
        return None if value is None else self.string(value, path)

    def integer(self, value: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
                hi is not None and value > hi):
            what = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
            self.fail(path, what, value)
        return value

    def number(self, value: Any, path: str, *, lo: float | None = None,
               hi: float | None = None, positive: bool = False) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) \
            and math.isfinite(value)
        if ok and ((lo is not None and value < lo) or (hi is not None and value > hi)
                   or (positive and value <= 0)):
            ok = False
        if not ok:
            what = "a finite number"
            if positive:
                what = "a positive finite number"
            elif lo is not None and hi is not None:
                what = f"a number in [{lo}, {hi}]"
            self.fail(path, what, value)
        return value

    def array(self, value: Any, path: str, *, length: int | None = None,
              nonempty: bool = True) -> Sequence[Any]:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            self.fail(path, "a JSON array", value)
        if length is not None and len(value) != length:
            self.fail(path, f"an array of {length} entries", value)
        if nonempty and not value:
            self.fail(path, "a non-empty array", value)
        return value

    def strings(self, value: Any, path: str, **kw: Any) -> tuple[str, ...]:
        return tuple(self.string(v, f"{path}[{i}]")
                     for i, v in enumerate(self.array(value, path, **kw)))

    def integers(self, value: Any, path: str, *, unique: bool = True, **kw: Any
                 ) -> tuple[int, ...]:
        out = tuple(self.integer(v, f"{path}[{i}]")
                    for i, v in enumerate(self.array(value, path, **kw)))
        if unique:
            seen: set[int] = set()
            for i, v in enumerate(out):
                if v in seen:
                    self.fail(f"{path}[{i}]", "each value once", v)
                seen.add(v)
        return out

    def numbers(self, value: Any, path: str, *, positive: bool = False, **kw: Any
                ) -> tuple[float, ...]:
        return tuple(self.number(v, f"{path}[{i}]", positive=positive)
                     for i, v in enumerate(self.array(value, path, **kw)))

    def sha256(self, value: Any, path: str) -> str | None:
        if value is not None and (not isinstance(value, str) or not _SHA256.fullmatch(value)):
            self.fail(path, "null or a SHA-256 digest (64 lower-case hex digits)", value)
        return value

    def json(self, value: Any, path: str) -> Any:
        """``value`` as read-only JSON data (finite numbers, string keys)."""
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)):
            return self.number(value, path)
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    self.fail(path, "an object with string keys", k)
                out[k] = self.json(v, f"{path}.{k}")
            return MappingProxyType(out)
        if isinstance(value, (list, tuple)):
            return tuple(self.json(v, f"{path}[{i}]") for i, v in enumerate(value))
        self.fail(path, "JSON data", value)


def _thaw(value: Any) -> Any:
    """Plain JSON-ready data (dicts, lists) from read-only data."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_thaw(v) for v in value]
    return value


# --------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to build the (source) network: a registered architecture and its arguments."""

    name: str
    #: builder keyword arguments (read-only JSON); ``None`` when the file names none
    kwargs: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str) -> ArchitectureSpec:
        data = check.obj(data, path, ("name", "kwargs"), ("name",))
        kwargs = data.get("kwargs")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            check.fail(f"{path}.kwargs", "a JSON object of builder arguments", kwargs)
        return cls(check.string(data["name"], f"{path}.name"),
                   None if kwargs is None else check.json(kwargs, f"{path}.kwargs"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.kwargs is not None:
            out["kwargs"] = _thaw(self.kwargs)
        return out


@dataclass(frozen=True)
class DatasetSpec:
    """The dataset a network classifies: all its class names, image shape, normalisation,
    and (written since 0.2) a fingerprint of the data it was made on: per split the number
    of images, the count per class and a SHA-256 over the labels and a fixed sample of
    images (see :mod:`modellego.data.fingerprint`)."""

    name: str
    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str) -> DatasetSpec:
        keys = ("name", "class_names", "input_shape", "mean", "std")
        data = check.obj(data, path, keys + ("fingerprint",), keys)
        shape = _shape(data["input_shape"], check, f"{path}.input_shape")
        names = check.strings(data["class_names"], f"{path}.class_names")
        fingerprint = None
        if "fingerprint" in data:
            fingerprint = _fingerprint(data["fingerprint"], len(names), check,
                                       f"{path}.fingerprint")
        return cls(check.string(data["name"], f"{path}.name"), names, shape,
                   check.numbers(data["mean"], f"{path}.mean", length=shape[0]),
                   check.numbers(data["std"], f"{path}.std", length=shape[0], positive=True),
                   fingerprint)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "class_names": list(self.class_names),
                               "input_shape": list(self.input_shape), "mean": list(self.mean),
                               "std": list(self.std)}
        if self.fingerprint is not None:
            out["fingerprint"] = _thaw(self.fingerprint)
        return out


#: the splits a dataset fingerprint may describe
FINGERPRINT_SPLITS = ("train", "val", "test")


def _fingerprint(value: Any, num_classes: int, check: _Check, path: str) -> Mapping[str, Any]:
    """A dataset fingerprint: ``{split: {n, class_counts, sha256}}`` for some of the splits,
    the counts one per class of the dataset and summing to ``n``."""
    data = check.obj(value, path, FINGERPRINT_SPLITS, ())
    out = {}
    for split, entry in data.items():
        p = f"{path}.{split}"
        keys = ("n", "class_counts", "sha256")
        entry = check.obj(entry, p, keys, keys)
        n = check.integer(entry["n"], f"{p}.n")
        counts = check.integers(entry["class_counts"], f"{p}.class_counts", unique=False,
                                length=num_classes)
        if sum(counts) != n:
            check.fail(f"{p}.class_counts", f"counts that sum to n ({n})", list(counts))
        digest = entry["sha256"]
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            check.fail(f"{p}.sha256", "64 lower-case hex digits", digest)
        out[split] = {"n": n, "class_counts": list(counts), "sha256": digest}
    return MappingProxyType(out)


#: the prefix of a file's router fingerprint tensors: a network's own tensor names are
#: dotted module paths, which never start with "@"
ROUTER_FINGERPRINT_PREFIX = "@fingerprint/"
#: the router fingerprint versions this modellego reads
ROUTER_FINGERPRINT_VERSIONS = (1,)
#: bounds that keep what a fingerprint may ask for small, whatever a file claims
MAX_FINGERPRINT_TAPS = 16
MAX_FINGERPRINT_DIM = 4096


@dataclass(frozen=True)
class RouterFingerprintSpec:
    """What a file's router fingerprint holds (``router_fingerprint``; the statistics a
    data-free router needs, see :mod:`modellego.assembly.fingerprint`): the tapped layers,
    each one's feature width, and how many of the owner's training images made it.

    Its tensors are stored beside the network's, named ``@fingerprint/...``
    (:meth:`tensor_shapes`)."""

    version: int
    taps: tuple[str, ...]
    dims: tuple[int, ...]
    images: int
    seed: int

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str) -> RouterFingerprintSpec:
        keys = ("version", "taps", "dims", "images", "seed")
        data = check.obj(data, path, keys, keys)
        version = check.integer(data["version"], f"{path}.version")
        if version not in ROUTER_FINGERPRINT_VERSIONS:
            check.fail(f"{path}.version", "1 (upgrade modellego to read newer fingerprints)",
                       version)
        taps = check.strings(data["taps"], f"{path}.taps")
        if len(taps) > MAX_FINGERPRINT_TAPS:
            check.fail(f"{path}.taps", f"at most {MAX_FINGERPRINT_TAPS} layers", list(taps))
        dims = tuple(check.integer(v, f"{path}.dims[{i}]", lo=1, hi=MAX_FINGERPRINT_DIM)
                     for i, v in enumerate(check.array(data["dims"], f"{path}.dims",
                                                       length=len(taps))))
        return cls(version, taps, dims, check.integer(data["images"], f"{path}.images", lo=2),
                   check.integer(data["seed"], f"{path}.seed"))

    def tensor_shapes(self, num_classes: int) -> dict[str, tuple[int, ...]]:
        """The fingerprint's tensors (names without the prefix) and their shapes: per tap
        ``i`` the class means ``means{i}`` and the tied precision ``precision{i}``; the mean
        and std of each tap's log distance (``tap_stats``) and of the combined score
        (``score_stats``) on the owner's held-out images."""
        out: dict[str, tuple[int, ...]] = {}
        for i, d in enumerate(self.dims):
            out[f"means{i}"] = (num_classes, d)
            out[f"precision{i}"] = (d, d)
        out["tap_stats"] = (2, len(self.dims))
        out["score_stats"] = (2,)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "taps": list(self.taps), "dims": list(self.dims),
                "images": self.images, "seed": self.seed}


def _shape(value: Any, check: _Check, path: str) -> tuple[int, int, int]:
    dims = check.array(value, path, length=3)
    c, h, w = (check.integer(v, f"{path}[{i}]", lo=1) for i, v in enumerate(dims))
    return c, h, w


@dataclass(frozen=True)
class InputContract:
    """What the network reads: ``(C, H, W)`` images normalised by ``mean`` and ``std``.

    Assemblies read ``[0, 1]`` images (``range``) and describe each part's ``adapters``."""

    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    range: str | None = None
    adapters: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str, *, assembly: bool = False
                  ) -> InputContract:
        keys = ("shape", "mean", "std") + (("range", "adapters") if assembly else ())
        data = check.obj(data, path, keys, keys)
        shape = _shape(data["shape"], check, f"{path}.shape")
        mean = check.numbers(data["mean"], f"{path}.mean", length=shape[0])
        std = check.numbers(data["std"], f"{path}.std", length=shape[0], positive=True)
        if not assembly:
            return cls(shape, mean, std)
        return cls(shape, mean, std, check.string(data["range"], f"{path}.range"),
                   check.strings(data["adapters"], f"{path}.adapters"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "mean": list(self.mean),
                               "std": list(self.std)}
        if self.range is not None:
            out["range"] = self.range
        if self.adapters is not None:
            out["adapters"] = list(self.adapters)
        return out


@dataclass(frozen=True)
class Metrics:
    """Measured numbers: each a finite number or an object of them (e.g. per class).

    Names ending in ``accuracy`` or ``base`` (and ``test_per_class``) are shares in [0, 1]."""

    values: Mapping[str, Any]

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str) -> Metrics:
        if not isinstance(data, Mapping):
            check.fail(path, "a JSON object of numbers", data)
        for key, value in data.items():
            share = key.endswith(("accuracy", "base", "per_class"))
            lo, hi = (0.0, 1.0) if share else (None, None)
            if isinstance(value, Mapping):
                for k, v in value.items():
                    check.number(v, f"{path}.{key}.{k}", lo=lo, hi=hi)
            else:
                check.number(value, f"{path}.{key}", lo=lo, hi=hi)
        return cls(check.json(data, path))

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return _thaw(self.values)


@dataclass(frozen=True)
class SourceRef:
    """A file another one was made from: its path when made and its SHA-256."""

    file: str | None
    sha256: str | None

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str, *, extra: Sequence[str] = ()
                  ) -> SourceRef:
        data = check.obj(data, path, ("file", "sha256", *extra), ())
        return cls(check.opt_string(data.get("file"), f"{path}.file"),
                   check.sha256(data.get("sha256"), f"{path}.sha256"))

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256}


@dataclass(frozen=True)
class Provenance:
    """How a file was made. Its content varies by command and is kept as read-only JSON;
    the entries readers rely on are checked (``made_by``, ``command``, versions, the
    ``source``/``teacher`` file, an assembly's ``calibration``)."""

    data: Mapping[str, Any]

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str) -> Provenance:
        if not isinstance(data, Mapping):
            check.fail(path, "a JSON object", data)
        for key in ("made_by", "modellego_version", "torch_version"):
            if key in data:
                check.string(data[key], f"{path}.{key}")
        if "command" in data:
            check.opt_string(data["command"], f"{path}.command")
        for key in ("source", "teacher"):
            if key in data:
                ref = check.obj(data[key], f"{path}.{key}",
                                ("file", "sha256", "kind", "classes", "architecture"), ())
                SourceRef.from_dict(ref, check, f"{path}.{key}",
                                    extra=("kind", "classes", "architecture"))
                if ref.get("kind") is not None:
                    check.string(ref["kind"], f"{path}.{key}.kind", choices=KINDS)
                if "classes" in ref:
                    check.integers(ref["classes"], f"{path}.{key}.classes")
        if "calibration" in data:
            calib = data["calibration"]
            if not isinstance(calib, Mapping):
                check.fail(f"{path}.calibration", "a JSON object", calib)
            check.string(calib.get("scaling", _MISSING), f"{path}.calibration.scaling",
                         choices=vocabulary("scaling"))
        return cls(check.json(data, path))

    @property
    def made_by(self) -> str | None:
        return self.data.get("made_by")

    @property
    def command(self) -> str | None:
        return self.data.get("command")

    @property
    def source(self) -> SourceRef | None:
        """The file a component was cut from (``None`` for other files)."""
        ref = self.data.get("source")
        return None if ref is None else SourceRef(ref.get("file"), ref.get("sha256"))

    @property
    def calibration(self) -> Mapping[str, Any] | None:
        return self.data.get("calibration")

    def to_dict(self) -> dict[str, Any]:
        return _thaw(self.data)


@dataclass(frozen=True)
class ComponentPlan:
    """A component's plan: per layer of its source, the channel indices it keeps.

    ``modules[name]`` holds ``"out"`` (and, for a conv or linear layer, ``"in"``): the
    kept indices, ascending. An attention layer whose heads can be removed gets ``"out"``:
    the heads it keeps; other per-channel tensors (a BatchNorm over a concatenation, a
    layer-scale parameter, a PReLU weight) get ``"out"`` by their qualified name: the
    indices kept along their one non-singleton axis. Plain data, so a component can be
    rebuilt from its source architecture, replayed or composed without any analysis; the
    same record is made by locating (:func:`modellego.surgery.plan.plan_from_masks`) and
    read from files."""

    modules: dict[str, dict[str, tuple[int, ...]]]

    def to_dict(self) -> dict[str, Any]:
        return {name: {k: list(v) for k, v in spec.items()}
                for name, spec in self.modules.items()}

    @classmethod
    def from_dict(cls, data: Any, check: _Check | None = None, path: str = "plan"
                  ) -> ComponentPlan:
        """The plan ``data`` holds. With ``check`` (a file being read) every field is
        validated and a bad one reported at ``path``; without, a malformed plan raises
        :class:`~modellego.errors.PlanError`."""
        if check is None:
            try:
                return cls({str(name): {str(k): tuple(int(i) for i in v)
                                        for k, v in spec.items()}
                            for name, spec in data.items()})
            except (AttributeError, TypeError, ValueError) as exc:
                raise PlanError(f"malformed component plan ({exc})") from None
        if not isinstance(data, Mapping) or not data:
            check.fail(path, "a non-empty JSON object of layers", data)
        modules = {}
        for name, spec in data.items():
            where = f"{path}.{name}"
            spec = check.obj(spec, where, ("out", "in"), ("out",))
            modules[name] = {key: check.integers(spec[key], f"{where}.{key}")
                             for key in spec}
        return cls(modules)

    def kept(self, name: str, key: str = "out") -> tuple[int, ...]:
        return self.modules[name][key]

    def compose(self, inner: ComponentPlan) -> ComponentPlan:
        """The plan that applies ``self`` and then ``inner`` (indices relative to ``self``)."""
        out = {}
        for name, spec in self.modules.items():
            sub = inner.modules.get(name)
            out[name] = {k: tuple(v[i] for i in sub[k]) if sub and k in sub else v
                         for k, v in spec.items()}
        return ComponentPlan(out)


#: the name plans had in manifests before there was one plan type (the same class)
PlanSpec = ComponentPlan


def _classes(data: Mapping[str, Any], dataset: DatasetSpec, check: _Check, prefix: str
             ) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``classes`` (ids of the dataset, in output order) and their ``class_names``."""
    classes = check.integers(data["classes"], f"{prefix}classes")
    for i, c in enumerate(classes):
        if c >= dataset.num_classes:
            check.fail(f"{prefix}classes[{i}]", f"a class id of {dataset.name} "
                       f"(0..{dataset.num_classes - 1})", c)
    names = check.strings(data["class_names"], f"{prefix}class_names", length=len(classes))
    for i, (c, n) in enumerate(zip(classes, names)):
        if n != dataset.class_names[c]:
            check.fail(f"{prefix}class_names[{i}]", f"{dataset.class_names[c]!r}, the name "
                       f"of class {c} in {prefix}dataset.class_names", n)
    return classes, names


def _input_of_dataset(contract: InputContract, dataset: DatasetSpec, check: _Check,
                      prefix: str) -> None:
    """A network may read its dataset's images in another form (an imported torchvision
    network reads RGB at 224 px, say): the images are converted on the way in, which is
    defined between equal channel counts and between grey and colour."""
    mine, theirs = contract.shape[0], dataset.input_shape[0]
    if mine != theirs and 1 not in (mine, theirs):
        check.fail(f"{prefix}input.shape", f"{theirs} channels as in {prefix}dataset."
                   "input_shape, or 1 (images of other channel counts cannot be converted)",
                   list(contract.shape))


@dataclass(frozen=True)
class PartSpec:
    """One part of an assembly: a model or component as it was when assembled."""

    kind: str
    architecture: ArchitectureSpec
    dataset: DatasetSpec
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    input: InputContract
    file: str | None
    sha256: str | None
    plan: ComponentPlan | None = None
    source: SourceRef | None = None
    head: str | None = None

    @classmethod
    def parse(cls, data: Any, source: str) -> PartSpec:
        """``data`` (a part's JSON entry) validated; errors name ``source``."""
        return cls.from_dict(data, _Check(source), "part")

    @classmethod
    def from_dict(cls, data: Any, check: _Check, path: str) -> PartSpec:
        data = check.obj(data, path, _PART_KEYS,
                         ("kind", "architecture", "dataset", "classes", "class_names",
                          "input", "file", "sha256"))
        kind = check.string(data["kind"], f"{path}.kind", choices=("model", "component"))
        p = f"{path}."
        dataset = DatasetSpec.from_dict(data["dataset"], check, f"{p}dataset")
        classes, names = _classes(data, dataset, check, p)
        contract = InputContract.from_dict(data["input"], check, f"{p}input")
        _input_of_dataset(contract, dataset, check, p)
        plan = source = head = None
        if kind == "component":
            plan = ComponentPlan.from_dict(data.get("plan", _MISSING), check, f"{p}plan")
            if "source" in data:
                source = SourceRef.from_dict(data["source"], check, f"{p}source")
            if "head" in data:
                head = check.string(data["head"], f"{p}head", choices=HEADS)
        else:
            for key in ("plan", "source", "head"):
                if key in data:
                    check.fail(f"{p}{key}", "no such field in a part of kind 'model'",
                               data[key])
        return cls(kind, ArchitectureSpec.from_dict(data["architecture"], check,
                                                    f"{p}architecture"),
                   dataset, classes, names, contract,
                   check.opt_string(data["file"], f"{p}file"),
                   check.sha256(data["sha256"], f"{p}sha256"), plan, source, head)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "architecture": self.architecture.to_dict(),
                               "dataset": self.dataset.to_dict(),
                               "classes": list(self.classes),
                               "class_names": list(self.class_names),
                               "input": self.input.to_dict(), "file": self.file,
                               "sha256": self.sha256}
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        if self.source is not None:
            out["source"] = self.source.to_dict()
        if self.head is not None:
            out["head"] = self.head
        return out


@dataclass(frozen=True)
class Label:
    """One output of an assembly: ``part``'s output ``part_output``, class ``class_id``."""

    dataset: str
    class_id: int
    name: str
    part: int
    part_output: int

    @property
    def key(self) -> str:
        """``"dataset:class"``, the key of per-class results."""
        return f"{self.dataset}:{self.class_id}"

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "class": self.class_id, "name": self.name,
                "part": self.part, "part_output": self.part_output}


@dataclass(frozen=True)
class UnionSpec:
    """The union layout's network: the source restricted to the union of the parts' plans."""

    architecture: ArchitectureSpec
    plan: ComponentPlan
    source: SourceRef

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture.to_dict(), "plan": self.plan.to_dict(),
                "source": self.source.to_dict()}


@dataclass(frozen=True)
class BaseSpec:
    """Base (the parts' own per-class accuracies), stored when the body is not the parts."""

    per_class: Mapping[str, float]
    measured_on: str

    def to_dict(self) -> dict[str, Any]:
        return {"per_class": dict(self.per_class), "measured_on": self.measured_on}


@dataclass(frozen=True)
class AssemblySpec:
    """What only an assembly has: layout, scaling, parts, labels and their side data."""

    layout: str
    scaling: str
    parts: tuple[PartSpec, ...]
    labels: tuple[Label, ...]
    #: per part, the layers whose inputs the calibrated router reads (``calibrated`` only)
    taps: tuple[tuple[str, ...], ...] | None = None
    union: UnionSpec | None = None
    base: BaseSpec | None = None

    def columns(self) -> list[list[int]]:
        """Per part, the outputs the assembly keeps (in output order)."""
        cols: list[list[int]] = [[] for _ in self.parts]
        for lab in self.labels:
            cols[lab.part].append(lab.part_output)
        return cols


def _labels(data: Any, parts: Sequence[PartSpec], check: _Check) -> tuple[Label, ...]:
    keys = ("dataset", "class", "name", "part", "part_output")
    labels, owners = [], set()
    last = (-1, -1)
    for i, raw in enumerate(check.array(data, "labels")):
        p = f"labels[{i}]"
        raw = check.obj(raw, p, keys, keys)
        k = check.integer(raw["part"], f"{p}.part", hi=len(parts) - 1)
        part = parts[k]
        j = check.integer(raw["part_output"], f"{p}.part_output", hi=len(part.classes) - 1)
        if (k, j) <= last:
            check.fail(p, "labels in the order of the parts' outputs (part, then "
                       f"part_output, increasing; the previous label is {last})", (k, j))
        last = (k, j)
        lab = Label(check.string(raw["dataset"], f"{p}.dataset"),
                    check.integer(raw["class"], f"{p}.class"),
                    check.string(raw["name"], f"{p}.name"), k, j)
        for field, mine, theirs in (
                ("dataset", lab.dataset, part.dataset.name),
                ("class", lab.class_id, part.classes[j]),
                ("name", lab.name, part.class_names[j])):
            if mine != theirs:
                check.fail(f"{p}.{field}", f"{theirs!r}, as output {j} of parts[{k}]", mine)
        if lab.key in owners:
            check.fail(p, "each (dataset, class) once", lab.key)
        owners.add(lab.key)
        labels.append(lab)
    for k in range(len(parts)):
        if not any(lab.part == k for lab in labels):
            check.fail("labels", f"at least one label of parts[{k}]", _thaw(data))
    return tuple(labels)


def _assembly(data: Mapping[str, Any], check: _Check
              ) -> tuple[AssemblySpec, tuple[int, ...], tuple[str, ...], InputContract]:
    layout = check.string(data["layout"], "layout", choices=vocabulary("layout"))
    scaling = check.string(data["scaling"], "scaling", choices=vocabulary("scaling"))
    if layout != "parallel" and scaling in FEATURE_SCALINGS:
        check.fail("scaling", f"none, logit or feature with layout {layout}", scaling)
    raw_parts = check.array(data["parts"], "parts")
    if len(raw_parts) < 2:
        check.fail("parts", "at least two parts", _thaw(raw_parts))
    parts = tuple(PartSpec.from_dict(p, check, f"parts[{k}]") for k, p in enumerate(raw_parts))
    labels = _labels(data["labels"], parts, check)
    classes = check.integers(data["classes"], "classes", length=len(labels))
    if list(classes) != list(range(len(labels))):
        check.fail("classes", f"the output indices 0..{len(labels) - 1}", classes)
    names = check.strings(data["class_names"], "class_names", length=len(labels))
    for i, (lab, n) in enumerate(zip(labels, names)):
        if n != f"{lab.dataset}:{lab.name}":
            check.fail(f"class_names[{i}]", repr(f"{lab.dataset}:{lab.name}"), n)
    contract = InputContract.from_dict(data["input"], check, "input", assembly=True)
    widest = tuple(max(p.input.shape[d] for p in parts) for d in range(3))
    if contract.shape != widest:
        check.fail("input.shape", f"{list(widest)}, the most channels and largest size "
                   "among the parts", list(contract.shape))
    channels = contract.shape[0]
    if contract.mean != (0.0,) * channels or contract.std != (1.0,) * channels:
        check.fail("input", "mean 0 and std 1 per channel (assemblies read [0, 1] images)",
                   {"mean": list(contract.mean), "std": list(contract.std)})
    if contract.range != "[0, 1]":
        check.fail("input.range", "'[0, 1]'", contract.range)
    n_adapters = 1 if layout == "union" else len(parts)
    # from_dict(assembly=True) always reads the adapters; the None check is for mypy
    if contract.adapters is None or len(contract.adapters) != n_adapters:
        check.fail("input.adapters", f"{n_adapters} adapter descriptions", contract.adapters)
    taps = None
    if scaling in FEATURE_SCALINGS:
        raw = check.array(data["taps"], "taps", length=len(parts))
        taps = tuple(check.strings(t, f"taps[{k}]") for k, t in enumerate(raw))
    elif data["taps"] is not None:
        check.fail("taps", f"null with scaling {scaling}", data["taps"])
    union = base = None
    if layout == "union":
        u = check.obj(data["union"], "union", ("architecture", "plan", "source"),
                      ("architecture", "plan", "source"))
        union = UnionSpec(ArchitectureSpec.from_dict(u["architecture"], check,
                                                     "union.architecture"),
                          ComponentPlan.from_dict(u["plan"], check, "union.plan"),
                          SourceRef.from_dict(u["source"], check, "union.source"))
        for k, p in enumerate(parts):
            if p.kind != "component" or p.source is None or p.source.sha256 is None \
                    or p.source.sha256 != union.source.sha256:
                check.fail(f"parts[{k}].source", "a component of the union's source "
                           f"(SHA-256 {union.source.sha256})", p.source and p.source.to_dict())
        b = check.obj(data["base"], "base", ("per_class", "measured_on"),
                      ("per_class", "measured_on"))
        per_class = b["per_class"]
        if not isinstance(per_class, Mapping) or set(per_class) != {lab.key for lab in labels}:
            check.fail("base.per_class", "one accuracy per label ("
                       f"{', '.join(lab.key for lab in labels)})", per_class)
        for key, value in per_class.items():
            check.number(value, f"base.per_class.{key}", lo=0.0, hi=1.0)
        base = BaseSpec(MappingProxyType(dict(per_class)),
                        check.string(b["measured_on"], "base.measured_on"))
    else:
        for key in ("union", "base"):
            if data[key] is not None:
                check.fail(key, f"null with layout {layout}", data[key])
    spec = AssemblySpec(layout, scaling, parts, labels, taps, union, base)
    return spec, classes, names, contract


# --------------------------------------------------------------------------- the manifest


class DictReads:
    """Read access as a mapping over ``to_dict()`` (a copy), for code written when the
    verbs returned dicts; deprecated: each read warns through :meth:`_dict_read`."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _dict_read(self, key: object) -> None:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        self._dict_read(key)
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """Deprecated: read :meth:`to_dict` or the attributes."""
        self._dict_read(key)
        return self.to_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._dict_read(key)
        return key in self.to_dict()

    def keys(self) -> Any:
        """Deprecated: read :meth:`to_dict` or the attributes."""
        self._dict_read("keys()")
        return self.to_dict().keys()


@dataclass(frozen=True)
class Manifest(DictReads):
    """The validated manifest of a model file (see the module docstring): what
    :func:`modellego.load_model` returns beside the network, and what the verbs return
    for the networks they make.

    ``architecture`` and ``dataset`` are set for models and components, ``plan`` (and
    possibly ``head``) for components, ``assembly`` for assemblies. :meth:`to_dict` gives
    the JSON the file holds; :meth:`for_model`, :meth:`for_component` and
    :meth:`for_assembly` build new ones, :meth:`updated` changes entries. Reading it as a
    dict (``manifest["classes"]``) reads :meth:`to_dict` and is deprecated.

    >>> model, manifest = load_model("checkpoints/digits/mobilenet_v2.safetensors")
    >>> manifest.kind, manifest.dataset.name, manifest.input.shape
    ('model', 'digits', (1, 28, 28))
    """

    kind: str
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    input: InputContract
    architecture: ArchitectureSpec | None = None
    dataset: DatasetSpec | None = None
    plan: ComponentPlan | None = None
    head: str | None = None
    assembly: AssemblySpec | None = None
    router_fingerprint: RouterFingerprintSpec | None = None
    metrics: Metrics | None = None
    provenance: Provenance | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> Manifest:
        """Validate ``data`` (a parsed manifest); ``source`` names the file in errors."""
        check = _Check(str(source))
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ModelFileError(f"{source}: manifest format is not {FORMAT!r}")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) \
                or not 1 <= version <= FORMAT_VERSION:
            raise ModelFileError(
                f"{source}: format version {version!r} is not supported by this modellego "
                f"(reads versions 1..{FORMAT_VERSION}); upgrade modellego")
        kind = data.get("kind", "model")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ModelFileError(f"{source}: unknown model kind {kind!r} in manifest; known: "
                                 f"{', '.join(sorted(KINDS))}; upgrade modellego")
        metrics = provenance = None
        if "metrics" in data:
            metrics = Metrics.from_dict(data["metrics"], check, "metrics")
        if "provenance" in data:
            provenance = Provenance.from_dict(data["provenance"], check, "provenance")
        if kind == "assembly":
            check.obj(data, "", _KEYS[kind], [k for k in _KEYS[kind]
                                             if k not in ("metrics", "provenance")])
            spec, classes, names, contract = _assembly(data, check)
            if provenance is not None and provenance.calibration is not None and \
                    provenance.calibration["scaling"] != spec.scaling:
                check.fail("provenance.calibration.scaling", repr(spec.scaling),
                           provenance.calibration["scaling"])
            return cls(kind, classes, names, contract, assembly=spec, metrics=metrics,
                       provenance=provenance, format_version=version)
        check.obj(data, "", _KEYS[kind], ("dataset", "classes", "class_names", "input"))
        if "architecture" not in data:
            raise ModelFileError(f"{source}: manifest has no architecture entry; expected "
                                 "an object {name, kwargs}, found nothing")
        arch = ArchitectureSpec.from_dict(data["architecture"], check, "architecture")
        dataset = DatasetSpec.from_dict(data["dataset"], check, "dataset")
        classes, names = _classes(data, dataset, check, "")
        contract = InputContract.from_dict(data["input"], check, "input")
        _input_of_dataset(contract, dataset, check, "")
        if metrics is not None:
            per_class = metrics.values.get("test_per_class")
            if isinstance(per_class, Mapping):
                for k in per_class:
                    if k not in {str(c) for c in classes}:
                        check.fail(f"metrics.test_per_class.{k}",
                                   "a class id listed in classes", k)
        router_fp = None
        if "router_fingerprint" in data:
            router_fp = RouterFingerprintSpec.from_dict(data["router_fingerprint"], check,
                                                        "router_fingerprint")
        plan = head = None
        if kind == "component":
            plan = ComponentPlan.from_dict(data.get("plan", _MISSING), check, "plan")
            if "head" in data:
                head = check.string(data["head"], "head", choices=HEADS)
        return cls(kind, classes, names, contract, architecture=arch, dataset=dataset,
                   plan=plan, head=head, router_fingerprint=router_fp, metrics=metrics,
                   provenance=provenance, format_version=version)

    @classmethod
    def create(cls, kind: str, entries: Mapping[str, Any], *,
               source: str = "the new manifest") -> Manifest:
        """A validated manifest of ``kind`` from its JSON ``entries`` (as a file holds them,
        without the ``format`` keys, which are stamped here); what passes reads back
        unchanged from a file. Invalid entries raise :class:`ModelFileError`."""
        data = {**entries, "kind": kind, "format": FORMAT, "format_version": FORMAT_VERSION}
        return cls.from_dict(_json_data(data, source), source=source)

    @classmethod
    def for_model(cls, *, architecture: Mapping[str, Any], dataset: Mapping[str, Any],
                  classes: Sequence[int], input: Mapping[str, Any] | None = None,
                  metrics: Mapping[str, Any] | None = None,
                  provenance: Mapping[str, Any] | None = None) -> Manifest:
        """The manifest of a network (kind ``model``) built by ``architecture`` (``{name,
        kwargs}``) with one output per class of ``classes`` of ``dataset`` (a dataset entry:
        ``{name, class_names, input_shape, mean, std[, fingerprint]}``); ``input`` defaults to
        the dataset's images as they are normalised."""
        return cls.create("model", {**_single(dataset, classes, input),
                                    "architecture": dict(architecture),
                                    **_optional(metrics=metrics, provenance=provenance)})

    @classmethod
    def for_component(cls, source: Manifest, plan: ComponentPlan, *,
                      dataset: Mapping[str, Any], classes: Sequence[int],
                      metrics: Mapping[str, Any] | None = None,
                      provenance: Mapping[str, Any] | None = None,
                      head: str | None = None) -> Manifest:
        """The manifest of a component cut from ``source`` (a model or component) that keeps
        ``plan`` (relative to ``source``'s network) for ``classes`` of ``dataset``: the plan
        is composed with the source's own when the source is a component, the network reads
        what the source's read, and the source's data fingerprint is carried."""
        if source.architecture is None or source.dataset is None:
            raise ModelFileError(f"a component is cut from a model or a component, not from "
                                 f"a {source.kind!r}")
        if source.plan is not None:
            plan = source.plan.compose(plan)
        entry = dict(dataset)
        if source.dataset.fingerprint is not None:  # made on the source's data
            entry["fingerprint"] = _thaw(source.dataset.fingerprint)
        return cls.create("component", {
            **_single(entry, classes, source.input.to_dict()),
            "architecture": source.architecture.to_dict(), "plan": plan.to_dict(),
            **_optional(metrics=metrics, provenance=provenance, head=head)})

    @classmethod
    def for_assembly(cls, *, layout: str, scaling: str, parts: Sequence[Mapping[str, Any]],
                     labels: Sequence[Mapping[str, Any]], input: Mapping[str, Any],
                     taps: Sequence[Sequence[str]] | None = None,
                     union: Mapping[str, Any] | None = None,
                     base: Mapping[str, Any] | None = None,
                     metrics: Mapping[str, Any] | None = None,
                     provenance: Mapping[str, Any] | None = None) -> Manifest:
        """The manifest of an assembly: its ``parts`` (as :class:`PartSpec` entries) and
        ``labels`` (one per output, in the order of the parts' outputs), the ``input`` it
        reads, and the layout's and scaling's side data."""
        return cls.create("assembly", {
            "layout": layout, "scaling": scaling, "parts": [dict(p) for p in parts],
            "labels": [dict(lab) for lab in labels],
            "classes": list(range(len(labels))),
            "class_names": [f"{lab['dataset']}:{lab['name']}" for lab in labels],
            "input": dict(input), "taps": None if taps is None else [list(t) for t in taps],
            "union": union, "base": base,
            **_optional(metrics=metrics, provenance=provenance)})

    def updated(self, **entries: Any) -> Manifest:
        """This manifest with top-level ``entries`` set (JSON data, e.g. ``metrics``), or
        removed where ``None`` is given, validated again."""
        data = self.to_dict()
        for key, value in entries.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value
        data.pop("format", None)
        data.pop("format_version", None)
        kind = data.pop("kind")
        return Manifest.create(kind, data)

    def __deepcopy__(self, memo: dict[int, Any]) -> Manifest:
        return self  # immutable: every entry is frozen or read-only JSON

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # pickled as its JSON (read-only mappings do not pickle), validated when unpickled
        return _from_json, (self.to_dict(),)

    def _dict_read(self, key: object) -> None:
        # read as a dict by code written when load_model returned one (see DictReads); the
        # package itself never does it
        warnings.warn(f"reading a Manifest as a dict ({key!r}) is deprecated: use its "
                      "attributes (manifest.classes, manifest.dataset.name, ...) or "
                      "manifest.to_dict()", DeprecationWarning, stacklevel=3)

    @property
    def num_outputs(self) -> int:
        """How many logits the network has (one per class)."""
        return len(self.classes)

    @property
    def own_dataset(self) -> DatasetSpec:
        """The dataset of a model or component (an assembly's parts each have their own:
        :class:`ModelFileError`)."""
        if self.dataset is None:
            raise ModelFileError(f"an {self.kind} has no single dataset; its parts each name "
                                 "their own")
        return self.dataset

    @property
    def own_architecture(self) -> ArchitectureSpec:
        """The architecture of a model or component (an assembly: :class:`ModelFileError`)."""
        if self.architecture is None:
            raise ModelFileError(f"an {self.kind} has no single architecture; its parts each "
                                 "name their own")
        return self.architecture

    @property
    def file_source(self) -> SourceRef | None:
        """The file this one was cut from (``provenance.source``), when it records one."""
        return None if self.provenance is None else self.provenance.source

    def to_dict(self) -> dict[str, Any]:
        """The JSON object to store (exactly what modellego 0.1.0 wrote for this file)."""
        out: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version,
                               "kind": self.kind, "classes": list(self.classes),
                               "class_names": list(self.class_names),
                               "input": self.input.to_dict()}
        if self.architecture is not None:
            out["architecture"] = self.architecture.to_dict()
        if self.dataset is not None:
            out["dataset"] = self.dataset.to_dict()
        if self.plan is not None:
            out["plan"] = self.plan.to_dict()
        if self.head is not None:
            out["head"] = self.head
        if self.router_fingerprint is not None:
            out["router_fingerprint"] = self.router_fingerprint.to_dict()
        if self.assembly is not None:
            a = self.assembly
            out.update({
                "layout": a.layout, "scaling": a.scaling,
                "parts": [p.to_dict() for p in a.parts],
                "labels": [lab.to_dict() for lab in a.labels],
                "taps": None if a.taps is None else [list(t) for t in a.taps],
                "union": None if a.union is None else a.union.to_dict(),
                "base": None if a.base is None else a.base.to_dict()})
        if self.metrics is not None:
            out["metrics"] = self.metrics.to_dict()
        if self.provenance is not None:
            out["provenance"] = self.provenance.to_dict()
        return out


def as_manifest(value: Manifest | Mapping[str, Any], *, source: str = "manifest") -> Manifest:
    """A manifest as the typed :class:`Manifest`.

    Args:
        value: a :class:`Manifest` (returned as it is), or a manifest as JSON data: a file's
            (as modellego 0.2's ``load_model`` returned it; its format version is checked)
            or one built by hand without the ``format`` keys.
        source: what to call it in errors.

    Returns:
        The validated :class:`Manifest`; :class:`ModelFileError` names the field that is
        wrong.

    >>> as_manifest(read_manifest("checkpoints/digits/mobilenet_v2.safetensors")).kind
    'model'
    """
    if isinstance(value, Manifest):
        return value
    if not isinstance(value, Mapping):
        raise ModelFileError(f"{source}: expected a Manifest or a manifest's JSON object, "
                             f"found {type(value).__name__}")
    if "format" in value:  # a file's manifest, as read: its version is checked
        return Manifest.from_dict(_json_data(value, source), source=source)
    entries = dict(value)
    return Manifest.create(str(entries.pop("kind", "model")), entries, source=source)


def _from_json(data: Mapping[str, Any]) -> Manifest:
    return Manifest.from_dict(data, source="a pickled manifest")


def manifest_text(data: Mapping[str, Any], source: str) -> str:
    """``data`` as the JSON text a file holds (keys sorted); :class:`ModelFileError` when it
    is not JSON data."""
    try:
        return json.dumps(data, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: the manifest is not JSON data ({exc}); use plain "
                             "dicts, lists, strings and finite numbers") from None


def _json_data(data: Mapping[str, Any], source: str) -> Any:
    """``data`` through JSON, as a file would hold it (so what validates reads back)."""
    return json.loads(manifest_text(data, source))


def _single(dataset: Mapping[str, Any], classes: Sequence[int],
            input: Mapping[str, Any] | None) -> dict[str, Any]:
    """The dataset, class and input entries of a model's or component's manifest."""
    names = dataset.get("class_names")
    chosen = [int(c) for c in classes]
    if not isinstance(names, Sequence) or any(not 0 <= c < len(names) for c in chosen):
        raise ModelFileError(f"classes {chosen}: not class ids of the dataset entry "
                             f"({_show(names)})")
    if input is None:
        input = {"shape": dataset.get("input_shape"), "mean": dataset.get("mean"),
                 "std": dataset.get("std")}
    return {"dataset": dict(dataset), "classes": chosen,
            "class_names": [names[c] for c in chosen], "input": dict(input)}


def _optional(**entries: Any) -> dict[str, Any]:
    """The entries that are given (not ``None``)."""
    return {k: v for k, v in entries.items() if v is not None}


__all__ = ["FORMAT", "FORMAT_VERSION", "HEADS", "KINDS", "LAYOUTS_0_1", "SCALINGS_0_1",
           "set_vocabulary", "vocabulary",
           "ArchitectureSpec", "AssemblySpec", "BaseSpec", "DatasetSpec", "InputContract",
           "ComponentPlan", "Label", "Manifest", "Metrics", "PartSpec", "Provenance",
           "RouterFingerprintSpec", "ROUTER_FINGERPRINT_PREFIX",
           "SourceRef", "UnionSpec", "as_manifest", "manifest_text"]
