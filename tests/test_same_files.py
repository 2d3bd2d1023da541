"""Issue 31: the typed records write the files the dict-based code wrote. The commands of
tests/data/before_typed/README.md (train, disassemble twice, compress, assemble) run again
with today's code, one thread, and every file equals the one written at commit 09cc6b8:
its manifest apart from the recorded modellego version, and its tensors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modellego.io import read_manifest

ROOT = Path(__file__).resolve().parents[1]
BEFORE = ROOT / "tests" / "data" / "before_typed"


def commands() -> list[list[str]]:
    block = re.findall(r"```sh\n(.*?)```", (BEFORE / "README.md").read_text(), re.S)[0]
    return [line.split()[1:] for line in block.splitlines() if line.startswith("modellego ")]


def without_version(manifest: dict) -> dict:
    out = dict(manifest)
    out["provenance"] = {k: v for k, v in out["provenance"].items()
                         if k != "modellego_version"}
    return out


@pytest.mark.slow
def test_the_typed_records_write_the_files_the_dicts_wrote(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    written = []
    for args in commands():
        done = subprocess.run([sys.executable, "-m", "modellego", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        written.append(args[args.index("--out") + 1])
    assert written == ["model.safetensors", "component.safetensors", "component-b.safetensors",
                       "compressed.safetensors", "assembly.safetensors"]
    for name in written:
        old, new = BEFORE / name, tmp_path / name
        assert without_version(read_manifest(new)) == without_version(read_manifest(old)), name
        before, now = load_file(old), load_file(new)
        assert sorted(now) == sorted(before), name
        for key, tensor in before.items():  # bit for bit on one thread of the same CPU kind
            torch.testing.assert_close(now[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    kinds = [read_manifest(tmp_path / n)["kind"] for n in written]
    # (a compressed model is the component of all its classes)
    assert kinds == ["model", "component", "component", "component", "assembly"]
