"""A small name -> object registry: methods, criteria, scalings and layouts use one each.

Registration order is kept (it is the order ``names()`` and the CLI's choices show), a name
can be registered once, and an unknown name gives a one-line error listing the known ones.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import ModelLegoError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind (``what``, e.g. ``"disassembly method"``).

    >>> COLOURS = Registry("colour"); COLOURS.register("red", (255, 0, 0))
    (255, 0, 0)
    >>> COLOURS.get("red"), COLOURS.names()
    ((255, 0, 0), ('red',))
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name``; a name already taken is a programming error."""
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered under ``name``."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ModelLegoError(f"unknown {self.what} {name!r}; use one of "
                                 f"{', '.join(self._items)}") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._items)})"
