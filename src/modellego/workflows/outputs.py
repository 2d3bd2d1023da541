"""The outputs of one command, checked before any work and written atomically after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ModelLegoError
from ..io import atomic_write


def check_outputs(outputs: dict[str, str | None], inputs: Sequence[str | Path],
                  force: bool) -> dict[str, Path]:
    """Refuse, before any work, output paths (``{flag: path}``, ``None`` = not asked for)
    that cannot or should not be written: a missing folder, a folder as the file, two
    outputs on one path, or an input overwritten without ``force``. Returns the paths given.
    """
    checked: dict[str, Path] = {}
    for flag, out in outputs.items():
        if out is None:
            continue
        path = Path(out)
        if not path.parent.exists():
            raise ModelLegoError(f"{flag} {out}: folder {path.parent} does not exist; create "
                                 "it or choose another path")
        if path.is_dir():
            raise ModelLegoError(f"{flag} {out} is a folder; give a file name inside it")
        for other_flag, other in checked.items():
            if path.resolve() == other.resolve():
                raise ModelLegoError(f"{flag} {out} is also the {other_flag} file; choose "
                                     "another path")
        if not force:
            for inp in inputs:
                if path.exists() and path.resolve() == Path(inp).resolve():
                    raise ModelLegoError(f"{flag} {out} would overwrite the input {inp}; "
                                         "choose another path or pass --force")
        checked[flag] = path
    return checked


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
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
