"""Model files as networks: :func:`load_model` / :func:`open_model` rebuild the network a
file describes and load its weights; :func:`save_model` writes one.

Loading checks the file against the network it claims before allocating that network: the
structure is first built on the ``meta`` device (no memory for weights) and its tensor names
and shapes compared with the safetensors header's table, and the number of logits compared
with the manifest's classes; only then is the network built for real and the weights read.
So a small file whose manifest asks for a huge network is refused without allocating it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import ModelFileError
from .io import _load_tensors, _prepared, read_header, save_weights, tensor_table
from .kinds import build_from_manifest
from .manifest import Manifest


@dataclass(frozen=True)
class LoadedModel:
    """A model file opened by :func:`open_model`: the network (eval mode) and its manifest."""

    model: nn.Module
    manifest: Manifest
    path: Path


def save_model(path: str | Path, model: nn.Module,
               manifest: Mapping[str, Any] | Manifest) -> None:
    """Save ``model``'s weights (state_dict incl. buffers) with ``manifest``.

    The manifest must be valid and let the package rebuild a network with one output per
    class; otherwise :class:`ModelFileError` and nothing is written. Tensors that share
    storage are saved as separate copies.
    """
    checked = _prepared(path, manifest)
    _check_outputs(checked, f"{path} (not written)")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_weights(path, state, checked)


def open_model(path: str | Path) -> LoadedModel:
    """Rebuild the network a model file describes, load its weights, return it in eval mode
    with its typed manifest.

    >>> loaded = open_model("checkpoints/fashion-mnist/vgg16_bn.safetensors")
    >>> loaded.manifest.dataset.name, loaded.manifest.class_names[:2]
    """
    path = Path(path)
    header, checked = read_header(path)
    manifest = checked.to_dict()
    table = tensor_table(header, path)
    model = None
    try:
        with torch.device("meta"):  # the structure only: nothing allocated for its weights
            skeleton = build_from_manifest(manifest)
    except Exception:  # a builder that needs real numbers: build it for real instead
        skeleton = model = _build(manifest, str(path))
    _compare_tensors(path, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()},
                     table)
    _check_outputs(checked, str(path), skeleton)
    tensors = _load_tensors(path)
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelFileError(f"{path}: tensor {k} contains NaN or infinite values")
    if model is None:
        model = _build(manifest, str(path))
    model.load_state_dict(tensors)
    return LoadedModel(model.eval(), checked, path)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a model file describes, load its weights, return it in eval mode
    with its (validated) manifest as a dict; see :func:`open_model` for the typed manifest.

    >>> model, manifest = load_model("checkpoints/fashion-mnist/vgg16_bn.safetensors")
    """
    loaded = open_model(path)
    return loaded.model, loaded.manifest.to_dict()


def _compare_tensors(path: Path, expected: dict[str, tuple[int, ...]],
                     found: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [k for k in expected if k in found and found[k] != expected[k]]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            details.append(f"shape mismatch for {k}: file {found[k]}, "
                           f"manifest implies {expected[k]}")
        raise ModelFileError(f"{path}: weights do not match the manifest: "
                             + "; ".join(details))


def _build(manifest: Mapping[str, Any], source: str) -> nn.Module:
    try:
        return build_from_manifest(manifest)
    except ModelFileError as exc:
        raise ModelFileError(f"{source}: {exc}") from None
    except Exception as exc:  # a manifest whose arguments the builder rejects
        raise ModelFileError(f"{source}: cannot rebuild the network from the manifest "
                             f"({type(exc).__name__}: {exc})") from None


def _count_outputs(manifest: Mapping[str, Any], shape: tuple[int, ...], source: str,
                   skeleton: nn.Module | None = None) -> int:
    """The number of logits of the network ``manifest`` describes, found by running a
    ``meta`` tensor (no data, no arithmetic) through a ``meta`` copy of it (``skeleton``, or
    one built here); only if an op has no meta kernel, by one zero image through a real
    copy."""
    try:
        with torch.device("meta"):
            net = skeleton if skeleton is not None else build_from_manifest(manifest)
            out = net.eval()(torch.zeros(1, *shape))
    except Exception:  # an op without a meta kernel, or a manifest the builder rejects
        real = _build(manifest, source)
        try:
            with torch.inference_mode():
                out = real.eval()(torch.zeros(1, *shape))
        except Exception as exc:
            raise ModelFileError(f"{source}: the network the manifest describes does not run "
                                 f"on its input shape {list(shape)} ({type(exc).__name__}: "
                                 f"{exc})") from None
    if out.dim() != 2:
        raise ModelFileError(f"{source}: the network gives outputs of shape "
                             f"{tuple(out.shape)}, not (batch, classes)")
    return int(out.shape[1])


def _check_outputs(manifest: Manifest, source: str, skeleton: nn.Module | None = None) -> None:
    """Refuse a manifest whose class list does not match its network's outputs (for an
    assembly: each part's classes its part network's, and the labels the logits)."""
    if manifest.assembly is not None:
        for k, part in enumerate(manifest.assembly.parts):
            n = _count_outputs(part.to_dict(), part.input.shape, source)
            if n != len(part.classes):
                raise ModelFileError(
                    f"{source}: manifest field parts[{k}].classes: expected one class per "
                    f"output of the part's network ({n}), found {len(part.classes)}")
    n = _count_outputs(manifest.to_dict(), manifest.input.shape, source, skeleton)
    if n != len(manifest.classes):
        field = "labels" if manifest.assembly is not None else "classes"
        raise ModelFileError(
            f"{source}: manifest field {field}: expected one entry per network output "
            f"({n}), found {len(manifest.classes)}")
