"""Architecture sources: where the network a model file names comes from.

The ``architecture.name`` of a manifest is ``SOURCE:TARGET`` or a bare zoo name:

``modellego:NAME`` (or ``NAME``)
    an architecture of modellego's own zoo (:func:`modellego.models.create_model`).
``torchvision:NAME``
    ``torchvision.models.get_model(NAME, weights=None, **kwargs)`` for any classification
    builder of ``torchvision.models.list_models()``.
``timm:NAME``
    ``timm.create_model(NAME, pretrained=False, **kwargs)``.
``python:package.module:callable``
    the user's own code: ``callable(**kwargs)`` must return an ``nn.Module``. Importing a
    module runs its code, so modellego never imports it because a file names it: the
    module (or a package holding it) must be granted with :func:`trusted` (the API's
    ``trust_code=[...]``, the CLI's ``--trust-code``) or listed in the environment variable
    ``MODELLEGO_TRUST_CODE`` (comma-separated); otherwise loading stops with a one-line
    error saying what the file asks to import and how to allow it.

No source ever downloads weights: arguments that would (``weights``, ``pretrained``,
``checkpoint_path``, ...) are refused, and the weights always come from the model file.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import importlib
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

from torch import nn

from ..errors import ModelFileError, ModelLegoError

TRUST_ENV = "MODELLEGO_TRUST_CODE"
SOURCES = ("modellego", "torchvision", "timm", "python")
#: the sources whose builders can be listed (``python:`` code is the user's own)
LISTED_SOURCES = ("modellego", "torchvision", "timm")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
#: builder arguments that would fetch weights from the network (or read another file)
_DOWNLOADS = {"torchvision": ("weights", "weights_backbone", "progress"),
              "timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                       "checkpoint_path", "cache_dir")}
_GRANTED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "modellego_trusted_code", default=())


def split_source(name: str) -> tuple[str, str]:
    """``(source, target)`` of an architecture name; a bare name is a zoo architecture.

    Raises :class:`ModelLegoError` for an unknown source or a malformed target.
    """
    source, sep, target = name.partition(":")
    if not sep:
        source, target = "modellego", name
    if source not in SOURCES:
        raise ModelLegoError(
            f"unknown architecture source {source!r} in {name!r}; expected one of "
            + ", ".join(f"{s}:NAME" for s in SOURCES[:3]) + " or python:package.module:callable")
    if source == "python":
        module, sep, attr = target.partition(":")
        if not sep or not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attr):
            raise ModelLegoError(
                f"architecture {name!r}: expected python:package.module:callable, e.g. "
                "python:mynets.models:build_net")
    elif not target or not re.fullmatch(r"[A-Za-z0-9_.\-]+", target):
        raise ModelLegoError(f"architecture {name!r}: expected {source}:NAME with a builder "
                             "name of letters, digits, '_', '-' and '.'")
    return source, target


def trust_list(modules: Iterable[str] | str | None) -> tuple[str, ...]:
    """The granted module names, checked (``'a.b'`` grants ``a.b`` and ``a.b.*``)."""
    if modules is None:
        return ()
    if isinstance(modules, str):
        modules = [modules]
    out = []
    for m in modules:
        m = str(m).strip()
        if not _DOTTED.fullmatch(m):
            raise ModelLegoError(f"`trust_code`: {m!r} is not a module name; grant a module "
                                 "such as mynets.models (it and its submodules may be imported)")
        out.append(m)
    return tuple(out)


@contextlib.contextmanager
def trusted(modules: Iterable[str] | str | None) -> Iterator[None]:
    """Within the block, model files may name code of ``modules`` (``python:`` sources).

    Args:
        modules: module names (a module grants its submodules too).

    Returns:
        A context manager.
    """
    grants = trust_list(modules)
    token = _GRANTED.set(_GRANTED.get() + grants)
    try:
        yield
    finally:
        _GRANTED.reset(token)


def granted() -> tuple[str, ...]:
    """Every module granted now: by :func:`trusted` and by ``$MODELLEGO_TRUST_CODE``."""
    env = tuple(m.strip() for m in os.environ.get(TRUST_ENV, "").split(",") if m.strip())
    return _GRANTED.get() + env


def is_granted(module: str) -> bool:
    return any(module == g or module.startswith(g + ".") for g in granted())


def _optional(package: str, name: str) -> Any:
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ModelLegoError(
            f"architecture {name!r} needs the {package} package, which is not installed: "
            f"pip install 'modellego[{package}]'") from None


def _no_downloads(source: str, name: str, kwargs: Mapping[str, Any]) -> None:
    bad = [k for k in _DOWNLOADS.get(source, ()) if k in kwargs]
    if bad:
        raise ModelLegoError(
            f"architecture {name!r}: argument {bad[0]!r} would load weights from elsewhere; "
            "modellego builds the bare network and loads the weights from the model file")


def source_names(source: str, pattern: str | None = None) -> list[str]:
    """The builders of ``source`` (``torchvision``: its classification builders; ``timm``:
    its models), sorted, optionally matching the shell glob ``pattern``."""
    if source == "torchvision":
        tv = _optional("torchvision", "torchvision:*")
        names = list(tv.models.list_models(module=tv.models))
    elif source == "timm":
        names = list(_optional("timm", "timm:*").list_models())
    else:
        raise ModelLegoError(f"`source` must be torchvision or timm, got {source!r}")
    return sorted(n for n in names if pattern is None or fnmatch.fnmatch(n, pattern))


def build_source(name: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The untrained network architecture ``name`` describes, built with ``kwargs``.

    ``modellego:`` names are built by the caller's zoo builder (see :func:`architecture`);
    this handles the other sources.
    """
    source, target = split_source(name)
    kwargs = dict(kwargs or {})
    _no_downloads(source, name, kwargs)
    if source == "torchvision":
        tv = _optional("torchvision", name)
        known = tv.models.list_models(module=tv.models)
        if target not in known:
            raise ModelLegoError(f"architecture {name!r}: torchvision has no classification "
                                 f"builder {target!r}; see torchvision.models.list_models()")
        net = tv.models.get_model(target, weights=None, **kwargs)
    elif source == "timm":
        timm = _optional("timm", name)
        if not timm.is_model(target):
            raise ModelLegoError(f"architecture {name!r}: timm has no model {target!r}; see "
                                 "timm.list_models()")
        net = timm.create_model(target, pretrained=False, **kwargs)
    elif source == "python":
        net = _call_user_code(name, target, kwargs)
    else:  # pragma: no cover - modellego: names are built by the zoo
        raise ModelLegoError(f"architecture {name!r} is built by the zoo")
    if not isinstance(net, nn.Module):
        raise ModelLegoError(f"architecture {name!r} built a {type(net).__name__}, not a "
                             "torch.nn.Module")
    return net


def _call_user_code(name: str, target: str, kwargs: dict[str, Any]) -> Any:
    module_name, _, attr = target.partition(":")
    if not is_granted(module_name):
        raise ModelFileError(
            f"the file's architecture {name!r} asks to import and run code of module "
            f"{module_name!r}, which is not trusted; if you trust it, grant it with "
            f"`trust_code` {module_name} (or set {TRUST_ENV}={module_name})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLegoError(f"architecture {name!r}: cannot import {module_name!r} "
                             f"({exc}); put it on the Python path") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelLegoError(f"architecture {name!r}: module {module_name!r} has no "
                                 f"{attr!r}")
    if not callable(obj):
        raise ModelLegoError(f"architecture {name!r}: {attr!r} is not callable")
    builder: Callable[..., Any] = obj
    try:
        return builder(**kwargs)
    except TypeError as exc:
        raise ModelLegoError(f"architecture {name!r} rejects the arguments "
                             f"{sorted(kwargs)} ({exc})") from None
