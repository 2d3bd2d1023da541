"""The outputs of one command, checked before any work and written atomically after it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ModelLegoError
from ..io import atomic_write, file_kind
from ..records import json_default


def check_outputs(outputs: dict[str, str | None], inputs: Sequence[str | Path],
                  force: bool) -> dict[str, Path]:
    """Refuse, before any work, output paths (``{flag: path}``, ``None`` = not asked for)
    that cannot or should not be written: a missing folder or one that is a file, a folder
    that cannot be written to, a folder as the file, a target that is not a regular file (a
    device, FIFO, or a symlink to one: writing would replace it), a name too long for the
    folder, two outputs on one path, or an input overwritten without ``force``. Returns the
    paths given."""
    checked: dict[str, Path] = {}
    for flag, out in outputs.items():
        if out is None:
            continue
        path = Path(out)
        _check_location(flag, out, path)
        for other_flag, other in checked.items():
            if path.resolve() == other.resolve():
                raise ModelLegoError(f"{flag} {out} is also the {other_flag} file; choose "
                                     "another path")
        if not force:
            for inp in inputs:
                if path.exists() and path.resolve() == Path(inp).resolve():
                    raise ModelLegoError(f"{flag} {out} would overwrite the input {inp}; "
                                         "choose another path or pass `force`")
        checked[flag] = path
    return checked


def _check_location(flag: str, out: str, path: Path) -> None:
    """Refuse a path whose file cannot be written where it is (see :func:`check_outputs`)."""
    folder = path.parent
    if not folder.exists():
        raise ModelLegoError(f"{flag} {out}: folder {folder} does not exist; create "
                             "it or choose another path")
    if not folder.is_dir():
        raise ModelLegoError(f"{flag} {out}: {folder} is not a folder but a "
                             f"{file_kind(folder)}; choose a path inside a folder")
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    room = len(f"..{os.getpid()}.12345678.tmp")  # the temporary file's name around it
    size = len(os.fsencode(path.name))
    if size + room > limit:
        raise ModelLegoError(f"{flag} {out}: the file name is {size} bytes, longer than the "
                             f"{limit - room} bytes the folder allows (the temporary file "
                             "written first needs the rest); choose a shorter name")
    if path.is_dir():
        raise ModelLegoError(f"{flag} {out} is a folder; give a file name inside it")
    kind = file_kind(path)
    if kind is not None and kind != "file":
        raise ModelLegoError(f"{flag} {out} is a {kind}, not a regular file; writing would "
                             "replace it, so give the path of a regular file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelLegoError(f"{flag} {out}: folder {folder} cannot be written to (read-only "
                             "or no permission); choose another folder")


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=json_default)
            fh.write("\n")

    atomic_write(Path(path), write)


def write_all(writers: Sequence[tuple[Path | None, Callable[[Path], None]]]) -> list[Path]:
    """Call each ``write(path)`` whose path was asked for, in order; returns the paths."""
    done = []
    for path, write in writers:
        if path is not None:
            write(path)
            done.append(path)
    return done
