"""The model file format: one ``.safetensors`` file, weights plus a JSON manifest.

The manifest lives in the safetensors header metadata under the key ``"modellego"``. It
says how to rebuild the network (architecture name and arguments, and for components the
channels kept from the source), what it classifies (dataset, class ids and names in output
order), its input contract (shape, normalisation) and how it was made. Loading parses only
the safetensors header and raw tensor bytes: nothing is ever unpickled.

Every reader and writer goes through :class:`modellego.manifest.Manifest`: a file whose
manifest has a missing or wrong field is refused with :class:`ModelFileError` naming the
field, and nothing is written that would be refused on reading. The header is read with
bounds (:data:`MAX_HEADER_BYTES`, :data:`MAX_JSON_DEPTH`, :data:`MAX_INT_DIGITS`), all
enforced by :func:`parse_json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelFileError
from .manifest import FORMAT, FORMAT_VERSION, Manifest

#: the largest safetensors header read (refused before reading it)
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: the deepest nesting of JSON arrays and objects accepted in a header or manifest
MAX_JSON_DEPTH = 64
#: the most digits an integer in a header or manifest may have
MAX_INT_DIGITS = 20
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
                 manifest: Mapping[str, Any] | Manifest) -> None:
    """Write ``tensors`` and ``manifest`` to ``path`` atomically.

    The manifest is validated exactly as on reading (:func:`checked_manifest`) first:
    nothing is written when it would be refused."""
    text = json.dumps(_prepared(path, manifest).to_dict(), sort_keys=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"modellego": text}))


def _prepared(path: str | Path, manifest: Mapping[str, Any] | Manifest) -> Manifest:
    """``manifest`` stamped with the format written, validated as it will be read."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    return checked_manifest({**manifest, "format": FORMAT, "format_version": FORMAT_VERSION},
                            source=f"{path} (not written)")


def checked_manifest(manifest: Mapping[str, Any] | Manifest, *, source: str) -> Manifest:
    """``manifest`` (a dict about to be saved) as a validated :class:`Manifest`.

    It goes through JSON and :func:`parse_json` as a file's manifest would, so what passes
    here reads back unchanged."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    try:
        text = json.dumps(manifest, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: the manifest is not JSON data ({exc}); use plain "
                             "dicts, lists, strings and finite numbers") from None
    return Manifest.from_dict(parse_json(text, what="manifest", source=source), source=source)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model file (validated), without reading the weights."""
    return _open(path, weights=False)[1].to_dict()


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and (validated) manifest of a model file; raises :class:`ModelFileError` on
    anything odd."""
    tensors, manifest = _open(path, weights=True)
    return tensors, manifest.to_dict()


# --------------------------------------------------------------------------- bounded JSON

_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class _Refused(Exception):
    """A JSON value refused while parsing (the message says why)."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits (at most "
                       f"{MAX_INT_DIGITS} are accepted)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:30]} is out of range")
    return value


def _parse_constant(text: str) -> float:
    raise _Refused(f"{text} (only finite numbers are accepted)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = None
        for k, _ in pairs:
            if k in seen:
                dup = k
                break
            seen.add(k)
        assert dup is not None  # fewer keys than pairs: some key repeats
        raise _Refused(f"the key {dup[:40]!r} twice in one object")
    return out


def parse_json(text: str | bytes, *, what: str, source: str | Path) -> Any:
    """Parse ``text`` refusing what could exhaust the parser or give wrong numbers: nesting
    deeper than :data:`MAX_JSON_DEPTH`, integers longer than :data:`MAX_INT_DIGITS` digits,
    NaN, infinities and repeated keys. Raises :class:`ModelFileError`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        depth = 0
        for token in _TOKENS.finditer(text):  # brackets outside strings
            char = token.group()
            if char in "[{":
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    raise _Refused(f"nesting deeper than {MAX_JSON_DEPTH} levels")
            elif char in "]}":
                depth -= 1
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_parse_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{source}: {what} is not valid JSON ({exc})") from None
    except _Refused as exc:
        raise ModelFileError(f"{source}: {what} refused: {exc}; the file is damaged or was "
                             "crafted, do not use it") from None


def _refuse_pickle(path: Path, head: bytes) -> None:
    looks_zip = head.startswith(b"PK\x03\x04")
    looks_pickle = head[:1] == b"\x80" and len(head) > 1 and head[1:2] in b"\x02\x03\x04\x05"
    if path.suffix.lower() in _PICKLE_SUFFIXES or looks_zip or looks_pickle:
        raise ModelFileError(
            f"{path}: this looks like a pickle-based PyTorch checkpoint; modellego never "
            "unpickles files because unpickling can run arbitrary code. Convert it yourself "
            "in a trusted environment to a state_dict saved with safetensors, then use "
            "`modellego.io.save_model`.")


def read_header(path: str | Path) -> tuple[dict[str, Any], Manifest]:
    """The safetensors header of a model file (a bounded read: at most
    :data:`MAX_HEADER_BYTES`) and its validated manifest; no tensor data is read."""
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
        if header_len > MAX_HEADER_BYTES:
            raise ModelFileError(
                f"{path}: safetensors header of {header_len} bytes is larger than the "
                f"{MAX_HEADER_BYTES // (1024 * 1024)} MiB modellego reads; the file is "
                "damaged or not a modellego model file")
        fh.seek(8)
        raw = fh.read(header_len)
    if len(raw) != header_len:
        raise ModelFileError(f"{path}: file is truncated (header of {header_len} bytes, "
                             f"{len(raw)} read)")
    header = parse_json(raw, what="safetensors header", source=path)
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: safetensors __metadata__ must be a JSON object of "
                             f"strings, found {type(meta).__name__}")
    bad = next((k for k, v in meta.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise ModelFileError(f"{path}: safetensors __metadata__ value {bad[:40]!r} must be a "
                             f"string, found {type(meta[bad]).__name__}")
    if "modellego" not in meta:
        raise ModelFileError(
            f"{path}: safetensors file has no modellego manifest; it was not written by "
            "modellego (use `modellego.save_model` to wrap plain weights)")
    manifest = Manifest.from_dict(parse_json(meta["modellego"], what="manifest", source=path),
                                  source=str(path))
    return header, manifest


def tensor_table(header: Mapping[str, Any], source: str | Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` as the safetensors header announces them (before any data is
    read, so that a file can be compared with the network it claims to hold)."""
    table: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelFileError(f"{source}: safetensors header entry {name[:60]!r} has no "
                                 "valid shape; the file is damaged")
        table[name] = tuple(shape)
    return table


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: cannot read weights ({exc}); the file is "
                             "corrupted or truncated") from None


def _open(path: str | Path, *, weights: bool) -> tuple[dict[str, torch.Tensor], Manifest]:
    path = Path(path)
    _, manifest = read_header(path)
    return (_load_tensors(path) if weights else {}), manifest


