"""Text shown on a terminal: control characters escaped, so data cannot steer the terminal.

Class names, dataset names and file names come from files anyone can craft. Printed raw, an
escape sequence in them recolours the terminal (``\\x1b[31m``), sets its title
(``\\x1b]0;...\\x07``) or, with a newline or carriage return, fakes lines of output.
:func:`printable` shows every such character as its Python escape instead; it is applied to
each value from the data in the tables, messages and logs modellego prints.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import unicodedata
import warnings
from collections.abc import Iterator
from typing import Any

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


_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("modellego_progress",
                                                              default=False)


@contextlib.contextmanager
def showing_progress(enabled: bool = True) -> Iterator[None]:
    """Within the block, long passes the library makes (profiles of many classes, streamed
    folders) show :class:`Progress` on stderr; outside, they show nothing."""
    token = _PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_enabled() -> bool:
    """Whether :func:`showing_progress` is on (the command line turns it on)."""
    return _PROGRESS.get()


class Progress:
    """A progress display for ``total`` steps of work called ``desc``: a tqdm bar when
    ``stream`` (default stderr) is a terminal; otherwise a few plain lines (at 25 %, 50 %,
    75 % and the end), so that a log file or CI shows no carriage-return spam. ``enabled``
    False shows nothing. :meth:`write` prints a line either way (between bar redraws)."""

    MILESTONES = (0.25, 0.5, 0.75, 1.0)

    def __init__(self, total: int, desc: str, *, enabled: bool = True,
                 stream: Any = None) -> None:
        self.total, self.desc, self.enabled = max(0, int(total)), desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.postfix, self._printed = 0, "", 0
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, leave=False, file=self.stream)

    def update(self, n: int = 1, **postfix: str) -> None:
        self.done += n
        if postfix:
            self.postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
            return
        if not self.enabled or not self.total:
            return
        reached = sum(1 for m in self.MILESTONES if self.done >= m * self.total)
        if reached > self._printed:  # a line at each milestone passed, not at every step
            self._printed = reached
            tail = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {self.done}/{self.total}{tail}", file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
