"""Run ``modellego`` in a child process under an address-space cap and a hard time limit.

Import as ``from subproc import run_capped`` (``tests/`` is on ``sys.path``, see helpers).
The child imports modellego first, reads its own address-space size (``VmSize``: torch alone
maps several hundred MB) and only then caps it ``margin`` bytes higher, so the cap measures
what the command itself allocates, on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

GIB = 1 << 30

_CHILD = """
import re, resource, sys
import modellego.cli
size = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
_, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (size + int(sys.argv[1]), hard))
sys.exit(modellego.cli.main(sys.argv[2:]))
"""

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_capped(argv: Sequence[object], *, margin: int = 3 * GIB // 2, timeout: float = 120,
               env: Mapping[str, str | None] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """``modellego *argv`` in a child allowed ``margin`` bytes of address space above its
    state after ``import modellego``; killed (``TimeoutExpired``) after ``timeout`` s.
    ``env`` adds variables to the child's environment (``None`` removes one)."""
    child_env = {**os.environ, "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key, value in (env or {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    return subprocess.run([sys.executable, "-c", _CHILD, str(margin), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, env=child_env,
                          stdin=subprocess.DEVNULL)
