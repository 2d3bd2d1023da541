"""Where each dataset's files are, when a command reads several datasets at once.

A :class:`DataRoots` is passed wherever a ``data_dir`` is taken. For a dataset ``NAME`` the
folder is, in this order: ``roots[NAME]`` (``--data NAME=PATH``); ``default`` (a single
``--data-dir``, for commands that read one dataset); ``$MODELLEGO_DATA/NAME`` when that
folder exists; the dataset's own default (the Debian package's Fashion-MNIST). Manifests
never store these paths: they are the user's machine, not the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..errors import DataError

#: the environment variable naming a folder with one sub-folder per dataset name
DATA_ENV = "MODELLEGO_DATA"


@dataclass(frozen=True)
class DataRoots:
    """A folder per dataset name (``roots``), a single ``default`` folder, and whether data
    whose fingerprint differs from the model's may be used anyway (``allow_mismatch``)."""

    roots: Mapping[str, str] = field(default_factory=dict)
    default: str | None = None
    allow_mismatch: bool = False

    def folder(self, name: str) -> Path | None:
        """The folder given for dataset ``name`` (see the module docstring), or ``None``."""
        if name in self.roots:
            return Path(self.roots[name])
        if self.default is not None:
            return Path(self.default)
        return env_folder(name)


def env_folder(name: str) -> Path | None:
    """``$MODELLEGO_DATA/name`` when the variable is set and that folder exists."""
    base = os.environ.get(DATA_ENV)
    if base:
        candidate = Path(base) / name
        if candidate.is_dir():
            return candidate
    return None


def parse_root(text: str) -> tuple[str, str]:
    """``"NAME=PATH"`` -> ``(name, path)``; a one-line error for anything else."""
    name, sep, path = text.partition("=")
    name, path = name.strip().lower(), path.strip()
    if not sep or not name or not path:
        raise DataError(f"`data` {text!r}: write NAME=PATH, e.g. mnist=/data/mnist")
    return name, path


def roots_from(entries: list[str] | None, default: str | None,
               allow_mismatch: bool = False) -> DataRoots | str | None:
    """What a command line's ``--data NAME=PATH`` (repeatable), ``--data-dir PATH`` and
    ``--allow-data-mismatch`` give, as the ``data_dir`` argument of the library."""
    if not entries and not allow_mismatch:
        return default
    roots: dict[str, str] = {}
    for entry in entries or []:
        name, path = parse_root(entry)
        if name in roots and roots[name] != path:
            raise DataError(f"`data` gives two folders for {name!r} ({roots[name]} and "
                            f"{path}); give one")
        roots[name] = path
    return DataRoots(roots, default, allow_mismatch)
