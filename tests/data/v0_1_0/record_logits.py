"""Record each fixture's logits on a fixed seeded input into ``logits.json`` (see README.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from modellego.files import load_model

HERE = Path(__file__).parent
FILES = ("model", "component", "component-b", "assembly")
SEED = 0
BATCH = 4


def seeded_input(shape: list[int]) -> torch.Tensor:
    """``BATCH`` uniform [0, 1) images of ``shape`` drawn from a generator seeded ``SEED``."""
    return torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(SEED))


def main() -> None:
    out = {"seed": SEED, "batch": BATCH, "torch_version": torch.__version__, "files": {}}
    for name in FILES:
        model, manifest = load_model(HERE / f"{name}.safetensors")
        with torch.no_grad():
            logits = model(seeded_input(manifest["input"]["shape"]))
        path = HERE / f"{name}.safetensors"
        out["files"][path.name] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                   "input_shape": manifest["input"]["shape"],
                                   "logits": logits.tolist()}
    (HERE / "logits.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
