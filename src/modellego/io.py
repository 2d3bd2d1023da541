"""The model file format: one ``.safetensors`` file, weights plus a JSON manifest.

The manifest lives in the safetensors header metadata under the key ``"modellego"``. It
says how to rebuild the network (architecture name and arguments, and for components the
channels kept from the source), what it classifies (dataset, class ids and names in output
order), its input contract (shape, normalisation) and how it was made. Loading parses only
the safetensors header and raw tensor bytes: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelFileError

FORMAT = "modellego.model"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"}


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only when it succeeded."""
    path = Path(path)
    if not path.parent.exists():
        raise ModelFileError(
            f"cannot write {path}: folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor],
                 manifest: dict[str, Any]) -> None:
    """Write ``tensors`` and ``manifest`` to ``path`` atomically."""
    manifest = {**manifest, "format": FORMAT, "format_version": FORMAT_VERSION}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"modellego": json.dumps(manifest, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model file, without reading the weights."""
    return _open(path, weights=False)[1]


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest of a model file; raises :class:`ModelFileError` on anything odd."""
    return _open(path, weights=True)


def _refuse_pickle(path: Path, head: bytes) -> None:
    looks_zip = head.startswith(b"PK\x03\x04")
    looks_pickle = head[:1] == b"\x80" and len(head) > 1 and head[1:2] in b"\x02\x03\x04\x05"
    if path.suffix.lower() in _PICKLE_SUFFIXES or looks_zip or looks_pickle:
        raise ModelFileError(
            f"{path}: this looks like a pickle-based PyTorch checkpoint; modellego never "
            "unpickles files because unpickling can run arbitrary code. Convert it yourself "
            "in a trusted environment to a state_dict saved with safetensors, then use "
            "`modellego.io.save_model`.")


def _open(path: str | Path, *, weights: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(16)
        _refuse_pickle(path, head)
        if len(head) < 8:
            raise ModelFileError(f"{path}: file is truncated (only {len(head)} bytes)")
        header_len = int.from_bytes(head[:8], "little")
        size = path.stat().st_size
        if header_len <= 0 or 8 + header_len > size:
            raise ModelFileError(
                f"{path}: not a valid safetensors file (header length {header_len} does not "
                f"fit in {size} bytes); the file is truncated or of another format")
        fh.seek(8)
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else {}
    if "modellego" not in meta:
        raise ModelFileError(
            f"{path}: safetensors file has no modellego manifest; it was not written by "
            "modellego (use `modellego.io.save_model` to wrap plain weights)")
    try:
        manifest = json.loads(meta["modellego"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFileError(f"{path}: manifest format is not {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(
            f"{path}: format version {version!r} is not supported by this modellego "
            f"(reads versions 1..{FORMAT_VERSION}); upgrade modellego")
    tensors: dict[str, torch.Tensor] = {}
    if weights:
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{path}: cannot read weights ({exc}); the file is "
                                 "corrupted or truncated") from None
    return tensors, manifest


# --- whole models -------------------------------------------------------------------------

_BUILDERS: dict[str, Any] = {}


def register_kind(kind: str):
    """Register how a manifest of ``kind`` is rebuilt into an (untrained) ``nn.Module``."""

    def wrap(fn):
        _BUILDERS[kind] = fn
        return fn

    return wrap


def build_from_manifest(manifest: dict[str, Any]) -> torch.nn.Module:
    """An ``nn.Module`` with the structure the manifest describes (weights not loaded)."""
    from . import assembly as _assembly  # noqa: F401  (registers its kinds)
    from .surgery import extract as _extract  # noqa: F401

    kind = manifest.get("kind", "model")
    if kind not in _BUILDERS:
        raise ModelFileError(f"unknown model kind {kind!r} in manifest; known: "
                             f"{', '.join(sorted(_BUILDERS))}; upgrade modellego")
    return _BUILDERS[kind](manifest)


@register_kind("model")
def _build_plain(manifest: dict[str, Any]) -> torch.nn.Module:
    from .models import create_model

    arch = manifest.get("architecture")
    if not isinstance(arch, dict) or "name" not in arch:
        raise ModelFileError("manifest has no architecture entry")
    return create_model(arch["name"], **arch.get("kwargs", {}))


def save_model(path: str | Path, model: torch.nn.Module, manifest: dict[str, Any]) -> None:
    """Save ``model``'s weights (state_dict incl. buffers) with ``manifest``.

    The manifest must let :func:`build_from_manifest` rebuild the structure. Tensors that
    share storage are saved as separate copies.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_weights(path, state, manifest)


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network a model file describes, load its weights, return it in eval mode.

    >>> model, manifest = load_model("checkpoints/fashion-mnist/vgg16_bn.safetensors")
    """
    tensors, manifest = load_weights(path)
    try:
        model = build_from_manifest(manifest)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    except Exception as exc:  # a manifest whose arguments the builder rejects
        raise ModelFileError(f"{path}: cannot rebuild the network from the manifest "
                             f"({type(exc).__name__}: {exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(f"shape mismatch for {k}: file {tuple(tensors[k].shape)}, "
                           f"manifest implies {tuple(expected[k].shape)}")
        raise ModelFileError(f"{path}: weights do not match the manifest: "
                             + "; ".join(details))
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelFileError(f"{path}: tensor {k} contains NaN or infinite values")
    model.load_state_dict(tensors)
    return model.eval(), manifest
