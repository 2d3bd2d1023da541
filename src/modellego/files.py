"""Model files as networks: :func:`load_model` / :func:`open_model` rebuild the network a
file describes and load its weights; :func:`save_model` writes one.

Loading checks the file against the network it claims before allocating that network: the
structure is first built on the ``meta`` device (no memory for weights) and its tensor names
and shapes compared with the safetensors header's table, and the number of logits compared
with the manifest's classes; only then is the network built for real and the weights read.
So a small file whose manifest asks for a huge network is refused without allocating it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import ModelFileError, ModelLegoError
from .io import _load_tensors, _prepared, file_sha256, read_table, save_weights
from .kinds import build_from_manifest
from .manifest import ROUTER_FINGERPRINT_PREFIX, Manifest
from .models.sources import split_source, trusted


@dataclass(frozen=True)
class LoadedModel:
    """A model file opened by :func:`open_model`: the network (eval mode), its manifest, and
    its router fingerprint's tensors when it carries one (names without the ``@fingerprint/``
    prefix; see :mod:`modellego.assembly.fingerprint`)."""

    model: nn.Module
    manifest: Manifest
    path: Path
    fingerprint: dict[str, torch.Tensor] | None = None


#: the attribute of a network that holds its router fingerprint's tensors between the verb
#: that made them (or :func:`open_model`) and :func:`save_model`
FINGERPRINT_ATTRIBUTE = "modellego_fingerprint"


def attach_fingerprint(model: nn.Module, tensors: Mapping[str, torch.Tensor] | None) -> None:
    """Keep a router fingerprint's ``tensors`` with ``model``, for :func:`save_model` (which
    writes them when the manifest it is given describes them); ``None`` removes them."""
    if tensors is None:
        model.__dict__.pop(FINGERPRINT_ATTRIBUTE, None)
    else:
        model.__dict__[FINGERPRINT_ATTRIBUTE] = dict(tensors)


def attached_fingerprint(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The router fingerprint tensors kept with ``model`` (see :func:`attach_fingerprint`)."""
    return model.__dict__.get(FINGERPRINT_ATTRIBUTE)


def save_model(path: str | Path, model: nn.Module,
               manifest: Mapping[str, Any] | Manifest, *,
               fingerprint: Mapping[str, torch.Tensor] | None = None) -> None:
    """Save ``model``'s weights (state_dict incl. buffers) with ``manifest``, and the tensors
    of its router ``fingerprint`` when the manifest describes one (``router_fingerprint``).

    Args:
        path: the ``.safetensors`` file to write (atomically).
        model: the network.
        manifest: its manifest, as a verb returned it.
        fingerprint: the router fingerprint's tensors; by default those the verb that made
            ``model`` kept with it (or :func:`open_model` read), when the manifest describes
            a fingerprint.

    A source file named by a relative path (relative to the working folder, as the verbs
    record it) is stored relative to ``path``'s folder, where
    :func:`modellego.assembly.union.find_source` looks first: the library and the command
    line write the same file. The manifest must be valid and let the package rebuild a
    network with one output per class, and the fingerprint's tensors must be exactly those
    it describes; otherwise :class:`ModelFileError` and nothing is written. That check runs
    on the ``meta`` device only, so a manifest asking for a huge network allocates nothing.
    Tensors that share storage are saved as separate copies.
    """
    manifest = _source_relative_to(manifest, Path(path))
    checked = _prepared(path, manifest)
    if fingerprint is None and checked.router_fingerprint is not None:
        fingerprint = attached_fingerprint(model)
    _check_outputs(checked, f"{path} (not written)")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if checked.router_fingerprint is not None or fingerprint is not None:
        if checked.router_fingerprint is None or fingerprint is None:
            raise ModelFileError(
                f"{path} (not written): a router fingerprint needs both its tensors and "
                "the manifest's router_fingerprint entry; give both or neither")
        shapes = {k: tuple(v.shape) for k, v in fingerprint.items()}
        _compare_tensors(Path(f"{path} (not written)"),
                         checked.router_fingerprint.tensor_shapes(checked.num_outputs), shapes,
                         what="router fingerprint tensors")
        state.update({ROUTER_FINGERPRINT_PREFIX + k: v.detach().float().clone()
                      for k, v in fingerprint.items()})
    save_weights(path, state, checked)


def _source_relative_to(manifest: Mapping[str, Any] | Manifest, out: Path
                        ) -> Mapping[str, Any] | Manifest:
    """``manifest`` with its relative source path made relative to the folder of ``out``,
    the file about to be written, when it names a file of the working folder (the one whose
    SHA-256 the manifest records: the verbs record the path as they were given it). A path
    read from a file is relative to that file's folder and is kept as it is."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    provenance = manifest.get("provenance") if isinstance(manifest, Mapping) else None
    source = provenance.get("source") if isinstance(provenance, Mapping) else None
    if not isinstance(provenance, Mapping) or not isinstance(source, Mapping):
        return manifest  # (an invalid manifest is refused by the validation that follows)
    stored = source.get("file")
    if not isinstance(stored, str) or not stored or Path(stored).is_absolute():
        return manifest
    if not Path(stored).is_file() or file_sha256(stored) != source.get("sha256"):
        return manifest  # not the working folder's file: a path stored relative to a file
    try:
        relative = os.path.relpath(Path(stored).resolve(), out.parent.resolve())
    except ValueError:  # another drive (Windows): keep the path as given
        return manifest
    return {**manifest, "provenance": {**provenance, "source": {**source, "file": relative}}}


#: the dtypes a floating-point tensor of the network may be stored as; they are read and
#: converted to the network's own dtype (float32): half precision loses nothing it had
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                 "I32": torch.int32, "I64": torch.int64, "U16": torch.uint16,
                 "U32": torch.uint32, "U64": torch.uint64, "F16": torch.float16,
                 "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def open_model(path: str | Path, *, trust_code: Sequence[str] | str | None = None
               ) -> LoadedModel:
    """Rebuild the network a model file describes, load its weights, return it in eval mode
    with its typed manifest.

    Args:
        path: the model file.
        trust_code: modules a ``python:`` architecture may import.

    Returns:
        A :class:`~modellego.files.LoadedModel`: the network and its typed manifest.

    Everything about the file is checked before memory is spent on the network: the
    structure is built on the ``meta`` device and its tensor names, shapes and dtypes
    compared with the header's table (see the module docstring and :func:`_compare_tensors`).

    A ``python:`` architecture imports the user's code: only modules granted in
    ``trust_code`` (or by :func:`modellego.models.trusted`, or ``$MODELLEGO_TRUST_CODE``)
    may be imported; otherwise :class:`ModelFileError` says what the file asks for.

    >>> loaded = open_model("checkpoints/fashion-mnist/vgg16_bn.safetensors")
    >>> loaded.manifest.dataset.name, loaded.manifest.class_names[:2]
    ('fashion-mnist', ('T-shirt/top', 'Trouser'))
    """
    with trusted(trust_code):
        return _open_model(Path(path))


def _open_model(path: Path) -> LoadedModel:
    _, checked, entries = read_table(path)
    manifest = checked.to_dict()
    skeleton = _build(manifest, str(path), meta=True)
    expected = skeleton.state_dict()
    entries, marked = _split_fingerprint(entries)
    _compare_tensors(path, {k: tuple(v.shape) for k, v in expected.items()},
                     {k: shape for k, (_, shape) in entries.items()})
    _compare_dtypes(path, {k: v.dtype for k, v in expected.items()}, entries)
    spec = checked.router_fingerprint
    fp_shapes = spec.tensor_shapes(checked.num_outputs) if spec is not None else {}
    _compare_tensors(path, fp_shapes, {k: shape for k, (_, shape) in marked.items()},
                     what="router fingerprint tensors")
    _compare_dtypes(path, {k: torch.float32 for k in fp_shapes}, marked)
    _check_outputs(checked, str(path), skeleton)
    tensors, fingerprint = _split_fingerprint(_load_tensors(path))
    fingerprint = {k: v.float() for k, v in fingerprint.items()}
    for k, v in fingerprint.items():
        if not torch.isfinite(v).all():
            raise ModelFileError(f"{path}: router fingerprint tensor {k} contains NaN or "
                                 "infinite values")
    for k, v in tensors.items():
        if v.dtype != expected[k].dtype:  # half or double precision: see FLOAT_DTYPES
            v = tensors[k] = v.to(expected[k].dtype)
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelFileError(f"{path}: tensor {k} contains NaN or infinite values")
    model = _build(manifest, str(path))
    _check_fixed(path, model, tensors)
    load_state(model, tensors)
    kept = fingerprint if spec is not None else None
    attach_fingerprint(model, kept)  # saved again with the model (see save_model)
    return LoadedModel(model.eval(), checked, path, kept)


def _split_fingerprint(items: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A file's entries (or tensors) split into the network's and its router fingerprint's
    (those named ``@fingerprint/...``, returned without the prefix)."""
    network, marked = {}, {}
    for k, v in items.items():
        if k.startswith(ROUTER_FINGERPRINT_PREFIX):
            marked[k[len(ROUTER_FINGERPRINT_PREFIX):]] = v
        else:
            network[k] = v
    return network, marked


def load_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """``model.load_state_dict(tensors)``, with the module versions the network's own state
    dict carries (``_metadata``): a file holds tensors only, and some modules (torchvision's
    MNASNet) refuse a state dict that does not say which version of them wrote it."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
    metadata = getattr(model.state_dict(), "_metadata", None)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state)


def load_model(path: str | Path, *, trust_code: Sequence[str] | str | None = None
               ) -> tuple[nn.Module, Manifest]:
    """Rebuild the network a model file describes, load its weights, return it in eval mode
    with its validated, typed manifest; :func:`open_model` also gives the file's path and
    router fingerprint.

    Args:
        path: the model file.
        trust_code: modules a ``python:`` architecture may import.

    Returns:
        ``(model, manifest)``: the network and its :class:`~modellego.manifest.Manifest`
        (``manifest.to_dict()`` is the JSON the file holds; reading the manifest as a dict,
        as code written for modellego 0.2 did, still works and is deprecated).

    >>> model, manifest = load_model("checkpoints/fashion-mnist/vgg16_bn.safetensors")
    >>> manifest.kind, manifest.classes[:3], manifest.dataset.name
    ('model', (0, 1, 2), 'fashion-mnist')
    """
    loaded = open_model(path, trust_code=trust_code)
    return loaded.model, loaded.manifest


def _compare_tensors(path: Path, expected: dict[str, tuple[int, ...]],
                     found: dict[str, tuple[int, ...]], *, what: str = "weights") -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(f"shape mismatch for {k}: file {found[k]}, "
                           f"manifest implies {expected[k]}")
        raise ModelFileError(f"{path}: {what} do not match the manifest: "
                             + "; ".join(details))


def _compare_dtypes(path: Path, expected: dict[str, torch.dtype],
                    found: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuse a tensor stored in a dtype the network cannot hold without changing what it
    means: a floating-point tensor (parameter or buffer) must be stored as floating point
    (:data:`FLOAT_DTYPES`, converted on loading); any other tensor (e.g. BatchNorm's int64
    ``num_batches_tracked``) in exactly the network's dtype."""
    for name, dtype in expected.items():
        stored = found[name][0]
        ok = stored in FLOAT_DTYPES if dtype.is_floating_point \
            else _TORCH_DTYPES.get(stored) == dtype
        if not ok:
            allowed = "float16, bfloat16, float32 or float64" if dtype.is_floating_point \
                else str(dtype).replace("torch.", "")
            raise ModelFileError(
                f"{path}: tensor {name} is stored as {stored}, but the network holds "
                f"{str(dtype).replace('torch.', '')} there (expected {allowed}); the file is "
                "damaged or was not written by modellego")


def _check_fixed(path: Path, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Tensors whose values the manifest itself fixes (a module lists them in its
    ``fixed_buffers``, e.g. an assembly's input normalisation) must hold those values."""
    for prefix, module in model.named_modules():
        for name in getattr(module, "fixed_buffers", ()):
            key = f"{prefix}.{name}" if prefix else name
            mine, theirs = getattr(module, name), tensors.get(key)
            if theirs is not None and not torch.equal(mine, theirs.to(mine.dtype)):
                shown = [round(float(v), 6) for v in theirs.flatten()[:8]]
                wanted = [round(float(v), 6) for v in mine.flatten()[:8]]
                raise ModelFileError(
                    f"{path}: tensor {key} holds {shown}, but the manifest fixes it to "
                    f"{wanted}; the file is damaged or was edited, do not use it")


def _build(manifest: Mapping[str, Any], source: str, *, meta: bool = False) -> nn.Module:
    """The network ``manifest`` describes; with ``meta``, its structure only (nothing is
    allocated for its weights, however large the manifest says it is)."""
    try:
        if meta:
            try:
                with torch.device("meta"):
                    return build_from_manifest(manifest)
            except (NotImplementedError, RuntimeError) as exc:
                if "meta" not in str(exc) or not _other_sources(manifest):
                    raise
            # a library's builder that computes its layout with tensors (torchvision's RegNet
            # takes its widths' values) cannot run on ``meta``: build it on the CPU, where
            # its size is the library's (our own zoo always builds on ``meta``)
            return build_from_manifest(manifest).to("meta")
        return build_from_manifest(manifest)
    except ModelFileError as exc:
        raise ModelFileError(f"{source}: {exc}") from None
    except Exception as exc:  # a manifest whose arguments the builder rejects
        raise ModelFileError(f"{source}: cannot rebuild the network from the manifest "
                             f"({type(exc).__name__}: {exc})") from None


def _other_sources(manifest: Mapping[str, Any]) -> bool:
    """Whether ``manifest`` (or a part or union source of it) names an architecture from
    outside modellego's own zoo (``torchvision:``, ``timm:``, granted ``python:`` code)."""
    specs = [manifest.get("architecture")] + [p.get("architecture") for p in
                                              manifest.get("parts", ())]
    specs.append((manifest.get("union") or {}).get("architecture"))
    names = [str(a.get("name", "")) for a in specs if isinstance(a, Mapping)]
    try:
        return any(split_source(n)[0] != "modellego" for n in names)
    except ModelLegoError:  # an unknown source: the builder has said so already
        return False


def _count_outputs(manifest: Mapping[str, Any], shape: tuple[int, ...], source: str,
                   skeleton: nn.Module | None = None) -> int:
    """The number of logits of the network ``manifest`` describes, found by running a
    ``meta`` tensor (no data, no arithmetic) through a ``meta`` copy of it (``skeleton``, or
    one built here). Never on a real copy: the manifest alone must not make modellego
    allocate (every registered architecture runs on ``meta``)."""
    net = skeleton if skeleton is not None else _build(manifest, source, meta=True)
    try:
        with torch.device("meta"):
            out = net.eval()(torch.zeros(1, *shape))
    except Exception as exc:
        raise ModelFileError(f"{source}: the network the manifest describes does not run "
                             f"on its input shape {list(shape)} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if out.dim() != 2:
        raise ModelFileError(f"{source}: the network gives outputs of shape "
                             f"{tuple(out.shape)}, not (batch, classes)")
    return int(out.shape[1])


def _check_outputs(manifest: Manifest, source: str, skeleton: nn.Module | None = None) -> None:
    """Refuse a manifest whose class list does not match its network's outputs (for an
    assembly: each part's classes its part network's, and the labels the logits)."""
    if manifest.assembly is not None:
        for k, part in enumerate(manifest.assembly.parts):
            n = _count_outputs(part.to_dict(), part.input.shape, source)
            if n != len(part.classes):
                raise ModelFileError(
                    f"{source}: manifest field parts[{k}].classes: expected one class per "
                    f"output of the part's network ({n}), found {len(part.classes)}")
    n = _count_outputs(manifest.to_dict(), manifest.input.shape, source, skeleton)
    if n != len(manifest.classes):
        field = "labels" if manifest.assembly is not None else "classes"
        raise ModelFileError(
            f"{source}: manifest field {field}: expected one entry per network output "
            f"({n}), found {len(manifest.classes)}")
