"""Reading a user's state dict: the weights ``modellego import`` wraps as a model file.

A ``.safetensors`` state dict is read as model files are (bounded header, checked tensor
table). A ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file is the one pickle-format file
modellego reads, and only through ``torch.load(weights_only=True)``: torch's restricted
unpickler, which builds tensors and plain containers and refuses anything that would
import or call code. A training checkpoint that wraps the state dict (``{"state_dict":
...}``, ``{"model": ...}``) and the ``module.`` prefix of DataParallel/DDP are unwrapped.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import ModelFileError
from .io import _load_tensors, _refuse_not_a_file, raw_header, tensor_entries

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: where training scripts commonly put the state dict inside a checkpoint
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the state dict in ``path`` (``.safetensors``, or a pickle-format
    ``torch.save`` file read with the weights-only unpickler)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"weights file {path} does not exist; give the state dict to "
                             "import")
    _refuse_not_a_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        header, size, header_len = raw_header(path)
        tensor_entries(header, path, data_size=size - 8 - header_len)
        tensors = _load_tensors(path)
    elif suffix in PICKLE_SUFFIXES:
        tensors = _unwrap(_torch_load(path), path)
    else:
        raise ModelFileError(
            f"{path}: unknown weights format {suffix or '(no suffix)'!r}; give a state dict "
            f"saved as .safetensors or with torch.save ({', '.join(PICKLE_SUFFIXES)})")
    if not tensors:
        raise ModelFileError(f"{path}: the file holds no tensors")
    return _strip_prefix(tensors)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported" in ln
                       or "global" in ln.lower()), first[0] if first else "")
        raise ModelFileError(
            f"{path}: refused: the file holds more than tensors and plain containers, and "
            f"modellego reads pickle files only with torch's weights-only loader "
            f"({detail[:160]}); save just the state dict (torch.save(model.state_dict(), "
            "FILE)) or use safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: cannot read the file with torch.load ({text[:160]}); "
                             "it is damaged or not a torch.save file") from None


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state(obj.get(key)):
                return dict(obj[key])
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and all(isinstance(k, str) for k in tensors):
            others = sorted(str(k) for k in obj if k not in tensors)[:3]
            raise ModelFileError(
                f"{path}: the file mixes tensors with other entries ({', '.join(others)}); "
                "save just the state dict (torch.save(model.state_dict(), FILE))")
    raise ModelFileError(
        f"{path}: holds a {type(obj).__name__}, not a state dict of tensors (looked also under "
        f"{', '.join(repr(k) for k in WRAPPER_KEYS)}); save the state dict with "
        "torch.save(model.state_dict(), FILE)")


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that (Distributed)DataParallel adds to every key."""
    if all(k.startswith("module.") for k in tensors):
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors
