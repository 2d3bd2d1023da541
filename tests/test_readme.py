"""The README's "Library" section runs as written, on the shipped checkpoints."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import modellego

ROOT = Path(__file__).resolve().parents[1]


def library_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    if not blocks:
        raise AssertionError("the README's Library section has no python code block")
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
    exec(compile(library_code(), "README.md:Library", "exec"), namespace)  # noqa: S102
    written = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert written, "the example saves at least one model file"
    for name in written:  # everything it saved loads back
        modellego.load_model(tmp_path / name)
    assert capsys.readouterr().out.strip(), "the example prints its results"
    assert os.getcwd() == str(tmp_path)
