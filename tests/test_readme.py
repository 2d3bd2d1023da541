"""The documentation's Library page (docs/library.md) runs as written, on the shipped
checkpoints; the MkDocs nav names every page of docs/; the README stays short and points
at the docs and the two set-up commands."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import modellego

ROOT = Path(__file__).resolve().parents[1]


LIBRARY_PAGE = ROOT / "docs" / "library.md"


def library_code() -> str:
    text = LIBRARY_PAGE.read_text()
    # the page is the Library section: everything after its "# Library" title
    section = text.split("# Library\n", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    if not blocks:
        raise AssertionError("docs/library.md has no python code block")
    return "\n".join(blocks)


def test_library_section_uses_only_the_public_api():
    code = library_code()
    imports = re.findall(r"^\s*(?:from\s+(\S+)\s+import|import\s+(\S+))", code, re.M)
    modules = {a or b for a, b in imports}
    assert modules == {"modellego"}, f"the example imports {sorted(modules)}"
    used = set(re.findall(r"\bml\.(\w+)", code))
    assert used and used <= set(modellego.__all__), sorted(used - set(modellego.__all__))


@pytest.mark.slow
def test_library_section_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(library_code(), "docs/library.md", "exec"), namespace)  # noqa: S102
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert written, "the example saves at least one model file"
    for name in written:  # everything it saved loads back
        modellego.load_model(tmp_path / name)
    assert capsys.readouterr().out.strip(), "the example prints its results"
    assert os.getcwd() == str(tmp_path)


def nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav names (read without a YAML parser: mkdocs is not a test
    dependency)."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text.split("\nnav:\n", 1)[1]
    nav = re.split(r"\n(?=\S)", nav, maxsplit=1)[0]  # up to the next top-level key
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", nav, re.M)


def test_the_docs_nav_names_every_page_and_only_pages_that_exist():
    pages = nav_pages()
    assert "index.md" in pages and len(pages) == len(set(pages)), pages
    assert [p for p in pages if not (ROOT / "docs" / p).is_file()] == []
    on_disk = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert sorted(on_disk - set(pages)) == [], "pages missing from mkdocs.yml's nav"


def test_readme_is_short_and_points_at_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    for needed in ("make demo", "make test", "docs/"):
        assert needed in text, needed


def test_the_cli_reference_page_is_the_parsers_help():
    from modellego.cli import reference_markdown

    page = (ROOT / "docs" / "cli-reference.md").read_text()
    assert page == reference_markdown(), "run python scripts/cli-reference.py"
    for command in ("disassemble", "assemble", "export", "compress"):
        assert f"\n## {command}\n" in page and f"usage: modellego {command}" in page


def test_the_api_reference_page_documents_every_public_name():
    page = (ROOT / "docs" / "api.md").read_text()
    documented = re.findall(r"^::: modellego\.(\w+)$", page, re.M)
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(set(modellego.__all__) - {"__version__"})


def test_every_public_function_documents_its_arguments_and_result():
    """The API reference's contract: a public function's docstring names each parameter
    under ``Args:`` and says what it returns under ``Returns:`` (unless it returns None)."""
    import inspect

    for name in modellego.__all__:
        obj = getattr(modellego, name)
        if inspect.isclass(obj) or not callable(obj):
            continue
        doc = inspect.getdoc(obj) or ""
        sig = inspect.signature(obj)
        args = doc.split("Args:", 1)[1].split("Returns:", 1)[0] if "Args:" in doc else ""
        for param in sig.parameters:
            assert re.search(rf"^\s+{param}:", args, re.M), f"{name}: Args lacks {param}"
        if sig.return_annotation not in (None, "None"):
            assert "Returns:" in doc, f"{name}: no Returns section"


def test_the_results_pages_are_what_the_benchmark_files_give(tmp_path):
    """docs/results.md and docs/scale.md hold the tables benchmarks/tables.py makes from
    benchmarks/results/*.json, and docs/figures/ the figures it draws (byte for byte: the
    SVGs carry no date and a fixed id salt)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    for page in ("results.md", "scale.md"):
        text = (ROOT / "docs" / page).read_text()
        assert tables.fill_tables(text) == text, f"run benchmarks/tables.py --docs ({page})"
    drawn = tables.draw_figures(tmp_path)
    assert len(drawn) == len(tables.FIGURES)
    for path in drawn:
        shipped = ROOT / "docs" / path.relative_to(tmp_path)
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale"
        assert f"]({path.relative_to(tmp_path).as_posix()})" in \
            (ROOT / "docs" / "results.md").read_text()


def test_the_repository_stays_small_enough_to_copy_to_a_gpu_machine():
    """Issue 29: at most 48 MiB of tracked files, so that the GPU check's working tree
    travels (the device tool takes 64 MiB with what a run carries)."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode()
    files = [ROOT / p for p in listed.split("\0") if p]
    assert len(files) > 100
    total = sum(f.stat().st_size for f in files if f.is_file())
    assert total <= 48 * 2**20, f"{total / 2**20:.1f} MiB tracked"
