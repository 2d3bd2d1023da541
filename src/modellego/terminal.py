"""Text shown on a terminal: control characters escaped, so data cannot steer the terminal.

Class names, dataset names and file names come from files anyone can craft. Printed raw, an
escape sequence in them recolours the terminal (``\\x1b[31m``), sets its title
(``\\x1b]0;...\\x07``) or, with a newline or carriage return, fakes lines of output.
:func:`printable` shows every such character as its Python escape instead; it is applied to
each value from the data in the tables, messages and logs modellego prints.
"""

from __future__ import annotations

import contextlib
import sys
import unicodedata
import warnings
from collections.abc import Iterator

from .errors import ModelLegoWarning

# bidirectional overrides and isolates reorder what follows them on screen
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    """``str(value)`` with control, bidirectional-override and line-separator characters
    escaped (``\\x1b``, ``\\n``, ``\\u202e``); other text, backslashes included, unchanged.

    >>> printable("cat\\x1b[31m\\n")
    'cat\\\\x1b[31m\\\\n'
    """
    text = str(value)
    if text.isprintable() and not _BIDI.intersection(text):
        return text  # the common case, without a per-character walk
    return "".join(
        _escape(ch) if (ch in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp")) else ch
        for ch in text)


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """While inside, each distinct :class:`~modellego.errors.ModelLegoWarning` is printed
    once to stderr as one ``modellego: warning: ...`` line (escaped), instead of Python's
    file-and-line echo; other warnings are shown as Python shows them."""
    shown: set[str] = set()
    python_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, ModelLegoWarning):
            python_show(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            print(f"modellego: warning: {printable(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ModelLegoWarning)
        warnings.showwarning = show
        yield
