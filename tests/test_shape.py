"""The code's shape: small functions, a command line whose parsers sit beside their commands
and take their choices from the registries, and library messages that name parameters, not
the command line's flags."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import modellego
from modellego.cli import build_parser

SRC = Path(modellego.__file__).parent
#: the longest a function in src/ may be, in lines (decorators excluded, docstring included)
MAX_FUNCTION_LINES = 80
#: a command-line flag inside a message: ``--name`` not part of a longer word
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def long_functions(source: str) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function of ``source`` longer than the limit: its lines
    from ``def`` to its end, less its docstring (the Args/Returns the API reference asks
    for are documentation, not code)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or \
                node.end_lineno is None:
            continue
        lines = node.end_lineno - node.lineno + 1
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                isinstance(first.value.value, str) and first.end_lineno is not None:
            lines -= first.end_lineno - first.lineno + 1
        if lines > MAX_FUNCTION_LINES:
            found.append((node.name, lines))
    return found


def test_long_functions_measures_lines():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]
    short = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    assert long_functions(f"def f():\n{short}\n") == []
    doc = "\n".join(["    \"\"\"Doc."] + ["    more"] * 20 + ["    \"\"\""])
    assert long_functions(f"def f():\n{doc}\n{short}\n") == []
    assert long_functions(f"def f():\n{doc}\n{body}\n") == [("f", MAX_FUNCTION_LINES + 1)]


def test_no_function_in_src_is_over_the_limit():
    found = [f"{path.relative_to(SRC)}:{name} ({lines} lines)"
             for path in sorted(SRC.rglob("*.py"))
             for name, lines in long_functions(path.read_text())]
    assert found == []


def flag_strings(source: str) -> list[tuple[int, str]]:
    """Strings of ``source`` (docstrings aside) that name a command-line flag."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                       ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and FLAG.search(node.value)]


def test_flag_strings_finds_flags_and_only_flags():
    source = ('"""Run with --out."""\n'
              'raise ValueError("pass --data-dir DIR")\n'
              'x = "a well-known --- rule, re-fit"\n')
    assert flag_strings(source) == [(2, "pass --data-dir DIR")]


def test_no_library_message_names_a_flag():
    """The library names its parameters (`` `data_dir` ``); the command line writes them as
    its flags (:func:`modellego.cli.cli_message`). Only the command line's own modules and
    the reports it prints (``workflows/reports.py``) may name flags."""
    allowed = {SRC / "workflows" / "reports.py"}
    found = [f"{path.relative_to(SRC)}:{line}: {text[:70]!r}"
             for path in sorted(SRC.rglob("*.py"))
             if path not in allowed and SRC / "cli" not in path.parents
             for line, text in flag_strings(path.read_text())]
    assert found == []


def test_each_command_has_its_parser_beside_it():
    """A command's parser and its run function live in one module of ``modellego.cli``,
    and no module there is long."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        run = command.get_default("func")
        module = run.__module__
        assert module.startswith("modellego.cli."), (name, module)
        source = Path(SRC / "cli" / (module.rsplit(".", 1)[1] + ".py")).read_text()
        assert f"sub.add_parser(\"{name}\"" in source, name
    for path in (SRC / "cli").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 250, path.name


def test_choices_come_from_the_registries():
    from modellego.analysis.locate import RULES
    from modellego.assembly import DUPLICATES, LAYOUTS, SCALINGS
    from modellego.compression import CRITERIA
    from modellego.disassembly import METHODS, PRESETS
    from modellego.exporting import FORMATS
    from modellego.models.sources import LISTED_SOURCES
    from modellego.training import OPTIMIZERS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices = {(name, a.dest): tuple(a.choices) for name, command in sub.choices.items()
               for a in command._actions if a.choices is not None}
    assert choices == {
        ("list-archs", "source"): LISTED_SOURCES,
        ("disassemble", "rule"): RULES, ("route", "rule"): RULES,
        ("disassemble", "method"): METHODS, ("compress", "method"): METHODS,
        ("disassemble", "preset"): PRESETS,
        ("assemble", "layout"): LAYOUTS, ("assemble", "scaling"): SCALINGS,
        ("assemble", "on_duplicate"): DUPLICATES,
        ("compress", "criterion"): CRITERIA,
        ("export", "format"): FORMATS,
        ("train", "optimizer"): ("auto",) + tuple(OPTIMIZERS),
    }


def defined_constants() -> dict[str, list[tuple[str, object]]]:
    """``{NAME: [(module, value), ...]}`` of the upper-case names each module of the package
    assigns at its top level (names it imports are not counted)."""
    import importlib

    found: dict[str, list[tuple[str, object]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module.endswith("__main__"):
            continue
        names = set()
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            names |= {t.id for t in targets if isinstance(t, ast.Name)
                      and t.id.isupper() and not t.id.startswith("_")}
        loaded = importlib.import_module(module)
        for name in names:
            found.setdefault(name, []).append((module, getattr(loaded, name)))
    return found


def test_one_meaning_per_name():
    """No two modules define one public constant or registry name with different
    contents (a name means one thing across the package)."""
    from typing import TypeVar

    clashes = {name: [m for m, _ in places] for name, places in defined_constants().items()
               if len(places) > 1 and not isinstance(places[0][1], TypeVar)
               and any(v != places[0][1] for _, v in places[1:])}
    assert clashes == {}
