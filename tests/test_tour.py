"""The five-minute tour of the README (and of the docs' home page, the same commands) runs
as written on the shipped checkpoints. (Its own file: a long test, which the parallel run
can then give a worker of its own.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import modellego

ROOT = Path(__file__).resolve().parents[1]


def tour_lines(page: Path) -> list[str]:
    """The commands of a page's five-minute tour: its first ``sh`` block."""
    text = page.read_text()
    section = text.split("## A five-minute tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    if not blocks:
        raise AssertionError(f"{page.name}'s tour has no sh block")
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_the_docs_tour_is_the_readmes():
    lines = tour_lines(ROOT / "README.md")
    assert lines == tour_lines(ROOT / "docs" / "index.md")
    assert [line.split()[1] for line in lines] == \
        ["evaluate", "disassemble", "disassemble", "assemble", "export"]


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path: Path):
    """Every command of the README's tour, run as written (``modellego`` is this
    interpreter's ``python -m modellego``) in a fresh directory beside the shipped
    checkpoints: each exits 0 without a traceback, and every file it names is written (the
    model files load back, the reports parse, the ONNX file is not empty)."""
    import json
    import shlex
    import subprocess
    import sys

    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    written: list[str] = []
    for line in tour_lines(ROOT / "README.md"):
        args = shlex.split(line, comments=True)
        assert args[0] == "modellego", line
        done = subprocess.run([sys.executable, "-m", "modellego", *args[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (line, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (line, done.stderr[-2000:])
        assert done.stdout.strip(), line
        for flag in ("--out", "--html", "--report"):
            if flag in args:
                name = args[args.index(flag) + 1]
                assert (tmp_path / name).is_file(), (line, name)
                written.append(name)
    assert written == ["fm-012.safetensors", "fm-012.html", "digits-789.safetensors",
                       "asm.safetensors", "asm.html", "asm.json", "asm.onnx"]
    for name in written:
        path = tmp_path / name
        if name.endswith(".safetensors"):
            modellego.load_model(path)
        elif name.endswith(".json"):
            assert json.loads(path.read_text())["evaluation"]
        elif name.endswith(".html"):
            assert path.read_text().lstrip().lower().startswith("<!doctype html")
        else:
            assert path.stat().st_size > 0
    _, manifest = modellego.load_model(tmp_path / "asm.safetensors")
    assert len(manifest.classes) == 6
