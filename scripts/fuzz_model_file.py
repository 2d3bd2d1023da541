"""Fuzz the model-file reader: mutated copies of a real small model file must either load
or be refused with ``ModelFileError``; any other exception is a bug.

Mutations: the header length bytes, the manifest's JSON text (characters replaced, inserted,
deleted), tensor-table entries (dtype, shape, data offsets), truncations and byte flips.
``tests/test_io.py`` runs a bounded number of examples; this script runs many more::

    PYTHONPATH=src python scripts/fuzz_model_file.py --examples 20000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "C64", "Q9", "", 3]


def model_file(folder: Path) -> bytes:
    """The bytes of a genuine small model file (lenet5, width 0.125, five classes)."""
    import torch

    from modellego.files import save_model
    from modellego.models import create_model

    names = ["a", "b", "c", "d", "e"]
    torch.manual_seed(0)
    net = create_model("lenet5", in_channels=1, num_classes=5, input_size=28, width=0.125)
    manifest = {"kind": "model",
                "architecture": {"name": "lenet5", "kwargs": {
                    "in_channels": 1, "num_classes": 5, "input_size": 28, "width": 0.125}},
                "classes": [0, 1, 2, 3, 4], "class_names": names,
                "dataset": {"name": "fuzz", "class_names": names, "input_shape": [1, 28, 28],
                            "mean": [0.5], "std": [0.25]},
                "input": {"shape": [1, 28, 28], "mean": [0.5], "std": [0.25]}}
    path = folder / "genuine.safetensors"
    save_model(path, net, manifest)
    return path.read_bytes()


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict[str, Any] | str, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8",
                                                                         "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw + body


@st.composite
def mutated(draw: Any, data: bytes) -> bytes:
    """One mutation of ``data`` (a model file's bytes)."""
    header, body = _split(data)
    kind = draw(st.sampled_from(["length", "manifest", "entry", "truncate", "flip", "json"]))
    if kind == "length":
        n = draw(st.one_of(st.integers(0, 2 ** 64 - 1),
                           st.integers(-64, 64).map(lambda d: max(0, len(data) // 2 + d))))
        return n.to_bytes(8, "little") + data[8:]
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
        return bytes(out)
    if kind == "manifest":
        text = header["__metadata__"]["modellego"]
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(text)))
            op = draw(st.sampled_from(["replace", "insert", "delete"]))
            piece = draw(st.sampled_from(['"', "{", "}", "[", "]", ",", ":", "0", "-1",
                                          "1e999", "9" * 30, "null", "true", "NaN", "1000000",
                                          "\\", "é", " "]))
            if op == "delete":
                text = text[:i] + text[i + 1:]
            elif op == "insert":
                text = text[:i] + piece + text[i:]
            else:
                text = text[:i] + piece + text[i + 1:]
        header["__metadata__"]["modellego"] = text
        return _join(header, body)
    if kind == "json":  # the header's own JSON text
        text = json.dumps(header)
        i = draw(st.integers(0, len(text)))
        return _join(text[:i] + draw(st.sampled_from(["", "{", "}", '"', ",", "0"]))
                     + text[i + draw(st.integers(0, 3)):], body)
    names = sorted(k for k in header if k != "__metadata__")
    entry = header[draw(st.sampled_from(names))]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif field == "shape":
        entry["shape"] = draw(st.one_of(
            st.lists(st.integers(-2, 10 ** 6), max_size=5), st.just("x"), st.none()))
    else:
        entry["data_offsets"] = draw(st.one_of(
            st.lists(st.integers(-2, len(body) + 10), max_size=3), st.just([0, 2 ** 63])))
    return _join(header, body)


def check(data: bytes, path: Path) -> None:
    """``data`` as a model file loads, or is refused with ``ModelFileError``."""
    from modellego.errors import ModelFileError
    from modellego.files import open_model

    path.write_bytes(data)
    try:
        open_model(path)
    except ModelFileError as exc:
        if "\n" in str(exc):
            raise AssertionError(f"a refusal of more than one line: {exc}") from None


def run(examples: int, folder: Path, seed: int | None = None) -> None:
    """Fuzz ``examples`` mutated files in ``folder``."""
    data = model_file(folder)
    target = folder / "fuzzed.safetensors"

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated(data))
    def fuzz(case: bytes) -> None:
        check(case, target)

    if seed is not None:
        from hypothesis import seed as with_seed

        fuzz = with_seed(seed)(fuzz)
    fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        run(args.examples, Path(folder), args.seed)
    print(f"{args.examples} mutated model files: each loaded or refused with ModelFileError")


if __name__ == "__main__":
    main()
