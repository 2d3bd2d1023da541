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

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ModelFileError, OutputWriteError
from .manifest import FORMAT, FORMAT_VERSION, Manifest, manifest_text

#: the largest safetensors header read (refused before reading it)
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: the deepest nesting of JSON arrays and objects accepted in a header or manifest
MAX_JSON_DEPTH = 64
#: the most digits an integer in a header or manifest may have
MAX_INT_DIGITS = 20
_PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"}


#: a temporary file of an output whose writer left no process id is stale after this long
STALE_TEMP_SECONDS = 60.0


def file_kind(path: str | Path) -> str | None:
    """What ``path`` is, following symlinks: ``None`` if nothing is there, ``"file"`` for a
    regular file, else ``"folder"``, ``"named pipe (FIFO)"``, ``"device"`` or ``"socket"``
    (``lstat``/``stat`` only: nothing is opened, so a FIFO never blocks)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:  # a loop of symlinks, a path component that is a file, ...
        if os.path.lexists(path):
            return f"path that cannot be followed ({exc.strerror})"
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def refuse_special_target(path: str | Path, what: str = "cannot write") -> None:
    """Refuse to replace ``path`` when it exists and is not a regular file (after following
    symlinks): writing atomically renames a new file over the target, which would replace a
    device such as ``/dev/null``, a FIFO or a folder instead of writing into it."""
    kind = file_kind(path)
    if kind is not None and kind != "file":
        raise ModelFileError(f"{what} {path}: it is a {kind}, not a regular file, and would "
                             "be replaced; give the path of a regular file")


def _temp_pattern(name: str) -> re.Pattern[str]:
    """``.NAME.<pid>.<random>.tmp`` (this version) or ``.NAME.<random>.tmp`` (0.1.0)."""
    return re.compile(re.escape(f".{name}.") + r"(?:(\d+)\.)?[A-Za-z0-9_]{8}\.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove temporary files a killed writer of ``path`` left beside it: those whose writer
    process is gone, or (names without a process id) untouched for
    :data:`STALE_TEMP_SECONDS`. A live writer's temporary file is never touched. Returns the
    files removed."""
    path = Path(path)
    pattern = _temp_pattern(path.name)
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    now = time.time()
    for entry in names:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        tmp = path.parent / entry
        try:
            info = os.lstat(tmp)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        pid = match.group(1)
        stale = (not _pid_alive(int(pid))) if pid is not None else \
            now - info.st_mtime > STALE_TEMP_SECONDS
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
                removed.append(tmp)
    return removed


def _write_failed(path: Path, exc: OSError) -> OutputWriteError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputWriteError(f"cannot write {path}: {reason}; nothing was written (free some "
                            "space, check the folder's permissions or choose another path)")


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only when it succeeded.

    The temporary file is ``.NAME.<pid>.<random>.tmp`` beside ``path``; any exception (also
    ``KeyboardInterrupt``, and SIGTERM through the command line) removes it, and stale ones
    of killed writers are removed first (:func:`remove_stale_temps`). A target that is not a
    regular file is refused (:func:`refuse_special_target`), before and right before the
    rename. An :class:`OSError` (no space, no permission) becomes :class:`OutputWriteError`.
    """
    path = Path(path)
    if not path.parent.exists():
        raise ModelFileError(
            f"cannot write {path}: folder {path.parent} does not exist; create it first")
    refuse_special_target(path)
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp",
                                   dir=path.parent)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        refuse_special_target(path)  # again: it may have appeared while writing
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, ModelFileError):
            raise _write_failed(path, exc) from None
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
    text = manifest_text(manifest, source)
    return Manifest.from_dict(parse_json(text, what="manifest", source=source), source=source)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model file (validated), without reading the weights.

    Args:
        path: the model file.

    Returns:
        The manifest, as a dict.
    """
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


#: bytes per element of each safetensors dtype
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1,
               "F8_E5M2FNUZ": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4,
               "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8}


def _refuse_pickle(path: Path, head: bytes, size: int) -> None:
    """Refuse pickles and ``torch.save`` zips, told from what a safetensors file cannot be:
    a safetensors header is a JSON object, so byte 8 is ``{``; a zip starts ``PK\\x03\\x04``,
    a binary pickle ``\\x80`` and its protocol (2..5). Only a file that is not a plausible
    safetensors file is taken for a pickle by its first bytes (a genuine file whose header
    length happens to start with ``80 02`` is read as what it is)."""
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    plausible = len(head) > 8 and head[8:9] == b"{" and 0 < header_len <= size - 8
    looks_zip = head.startswith(b"PK\x03\x04")
    looks_pickle = head[:1] == b"\x80" and len(head) > 1 and head[1:2] in b"\x02\x03\x04\x05"
    if path.suffix.lower() in _PICKLE_SUFFIXES or (not plausible and (looks_zip
                                                                      or looks_pickle)):
        raise ModelFileError(
            f"{path}: this looks like a pickle-based PyTorch checkpoint, not a modellego "
            "model file (.safetensors); modellego never unpickles model files because "
            "unpickling can run "
            "arbitrary code. If it is a state dict, wrap it with the modellego import "
            "command or modellego.import_model (which read it with torch's restricted "
            "weights-only loader)")


def _refuse_not_a_file(path: Path) -> None:
    """A model file must be a regular file: say what the path is instead (never opened)."""
    kind = file_kind(path)
    if kind is None:
        raise ModelFileError(f"model file {path} does not exist")
    if kind == "folder":
        raise ModelFileError(f"model file {path} is a folder, and a model file of that name "
                             "does not exist; give the path of a .safetensors file")
    if kind != "file":
        raise ModelFileError(f"model file {path} is a {kind}, not a regular file; modellego "
                             "reads model files from regular files only (copy it to one)")


def _open_regular(path: Path) -> Any:
    """``path`` opened for reading without ever blocking (a FIFO swapped in after the check
    would block a plain ``open``), refused unless it is a regular file."""
    _refuse_not_a_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ModelFileError(f"model file {path} cannot be read ({exc.strerror}); check its "
                             "permissions") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        _refuse_not_a_file(path)
        raise ModelFileError(f"model file {path} is not a regular file")
    return os.fdopen(fd, "rb")


def raw_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The parsed safetensors header of ``path`` (a bounded read: at most
    :data:`MAX_HEADER_BYTES`), the file's size and the header's length; a pickle-format
    file is refused (see :func:`_refuse_pickle`)."""
    with _open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(16)
        _refuse_pickle(path, head, size)
        if len(head) < 8:
            raise ModelFileError(f"{path}: file is truncated (only {len(head)} bytes)")
        header_len = int.from_bytes(head[:8], "little")
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
    return header, size, header_len


def read_header(path: str | Path) -> tuple[dict[str, Any], Manifest]:
    """The safetensors header of a model file (a bounded read: at most
    :data:`MAX_HEADER_BYTES`) and its validated manifest; no tensor data is read."""
    header, manifest, _ = read_table(path, check=False)
    return header, manifest


def read_table(path: str | Path, *, check: bool = True
               ) -> tuple[dict[str, Any], Manifest, dict[str, tuple[str, tuple[int, ...]]]]:
    """:func:`read_header` and the header's tensor table (:func:`tensor_entries`), each
    entry checked against the file's size when ``check`` (else the table is empty)."""
    path = Path(path)
    header, size, header_len = raw_header(path)
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
            "modellego (wrap a plain state dict with the modellego import command)")
    manifest = Manifest.from_dict(parse_json(meta["modellego"], what="manifest", source=path),
                                  source=str(path))
    if not check:
        return header, manifest, {}
    return header, manifest, tensor_entries(header, path, data_size=size - 8 - header_len)


def tensor_entries(header: Mapping[str, Any], source: str | Path, *,
                   data_size: int | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (safetensors dtype, shape)}`` of a safetensors header, each entry
    checked as the format requires: a known dtype, a shape of non-negative integers, and
    data offsets ``[begin, end]`` that hold exactly the tensor's bytes (inside the file's
    ``data_size`` bytes of tensor data, when given)."""
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{source}: safetensors header entry {name[:60]!r}"
        if not isinstance(entry, dict):
            raise ModelFileError(f"{where} is not a JSON object; the file is damaged")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelFileError(f"{where} has no valid shape; the file is damaged")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise ModelFileError(f"{where} has an unknown dtype {str(dtype)[:20]!r} (known: "
                                 f"{', '.join(DTYPE_SIZES)}); the file is damaged")
        offsets = entry.get("data_offsets")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets) \
                or offsets[1] - offsets[0] != nbytes \
                or (data_size is not None and offsets[1] > data_size):
            raise ModelFileError(f"{where}: cannot read weights (data offsets "
                                 f"{str(offsets)[:40]} do not hold its {nbytes} bytes inside "
                                 "the file); the file is corrupted or truncated")
        entries[name] = (dtype, tuple(shape))
    return entries


def tensor_table(header: Mapping[str, Any], source: str | Path) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` as the safetensors header announces them (before any data is
    read, so that a file can be compared with the network it claims to hold)."""
    return {name: shape for name, (_, shape) in tensor_entries(header, source).items()}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    _refuse_not_a_file(path)  # it may have been swapped since the header was read
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: cannot read weights ({exc}); the file is "
                             "corrupted or truncated") from None


def _open(path: str | Path, *, weights: bool) -> tuple[dict[str, torch.Tensor], Manifest]:
    path = Path(path)
    if not weights:
        return {}, read_header(path)[1]
    _, manifest, _ = read_table(path)
    return _load_tensors(path), manifest


