"""``modellego import``: wrap a network trained elsewhere (torchvision, timm, the user's own
class) and its state dict as a modellego model file.

The architecture is named by its source (see :mod:`modellego.models.sources`); the state
dict is read safely (:mod:`modellego.statedict`) and must match the built network key for
key and shape for shape; the network must have one output per class; the input contract
(channels, size, mean, std) is recorded so that every later command feeds the network its
dataset's images the way it was trained to read them; the imported network is evaluated
on the dataset's test split and its accuracy stored in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .._version import __version__
from ..assembly.fingerprint import fingerprinted
from ..data import dataset_fingerprint, dataset_info, is_folder
from ..data.base import DatasetInfo
from ..data.registry import FOLDER_PREFIX
from ..errors import ModelLegoError
from ..evaluation import evaluate
from ..files import load_state
from ..io import file_sha256
from ..manifest import Manifest
from ..models import build_architecture, split_source
from ..records import ImportReport
from ..statedict import read_state_dict
from ..training import check_classes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: how many names of missing / unexpected / mis-shaped tensors an error lists
SHOWN = 3


@dataclass(frozen=True)
class ImportConfig:
    """What :func:`import_model` wraps: an architecture source and its builder arguments,
    the dataset the network classifies (``classes``: its outputs in order, default all),
    and the input contract (``input_size``: ``(H, W)``; ``mean``/``std`` per channel;
    each default as described in :func:`input_contract`)."""

    architecture: str
    dataset: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    classes: Sequence[int] | None = None
    input_size: tuple[int, int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    evaluate: bool = True

    def validate(self) -> None:
        split_source(self.architecture)
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str)
                                                           for k in self.kwargs):
            raise ModelLegoError("`kwargs` must be a JSON object of builder arguments, e.g. "
                                 '{"num_classes": 10}')
        if self.input_size is not None and (len(self.input_size) != 2 or any(
                int(s) != s or not 8 <= s <= 4096 for s in self.input_size)):
            raise ModelLegoError(f"`input_size` must be one or two integers in 8..4096, got "
                                 f"{self.input_size}")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and (not values or not all(math.isfinite(v)
                                                             for v in values)):
                raise ModelLegoError(f"`{name}` must be finite numbers, one per channel (or "
                                     f"one for all), got {values}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ModelLegoError(f"`std` must be positive, got {list(self.std)}")


def builder_kwargs(config: ImportConfig, info: DatasetInfo, n_classes: int) -> dict[str, Any]:
    """The builder's arguments: the given ones, plus ``num_classes`` (and for our own zoo the
    dataset's channels and size) where they are not given."""
    source, _ = split_source(config.architecture)
    kwargs = dict(config.kwargs)
    if source in ("torchvision", "timm", "modellego"):
        kwargs.setdefault("num_classes", n_classes)
    if source == "modellego":
        size = config.input_size or info.input_shape[1:]
        kwargs.setdefault("in_channels", info.input_shape[0])
        kwargs.setdefault("input_size", int(size[0]))
    return kwargs


def input_channels(model: nn.Module) -> int | None:
    """The channels the network's first convolution reads (``None``: it has none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else int(first.in_channels)


def input_contract(config: ImportConfig, info: DatasetInfo, channels: int) -> dict[str, Any]:
    """The recorded input: ``channels`` as the network reads them; the size given, else the
    dataset's; mean/std given, else ImageNet's for colour photos of an image folder, else the
    dataset's (a grey dataset's value repeated for a colour network, a colour dataset's
    averaged for a grey one)."""
    size = tuple(int(s) for s in (config.input_size or info.input_shape[1:]))

    def per_channel(given: Sequence[float] | None, imagenet: tuple[float, ...],
                    own: tuple[float, ...], name: str) -> list[float]:
        if given is not None:
            values = [float(v) for v in given]
            if len(values) == 1:
                values *= channels
            if len(values) != channels:
                raise ModelLegoError(f"`{name}` has {len(values)} values; the network reads "
                                     f"{channels} channels (give {channels} or one)")
            return values
        if channels == 3 and info.name.startswith(FOLDER_PREFIX):
            return list(imagenet)
        if len(own) == channels:
            return list(own)
        if len(own) == 1:
            return [own[0]] * channels
        return [round(sum(own) / len(own), 6)] * channels

    mean = per_channel(config.mean, IMAGENET_MEAN, tuple(info.mean), "mean")
    std = per_channel(config.std, IMAGENET_STD, tuple(info.std), "std")
    if any(v <= 0 for v in std):
        raise ModelLegoError(f"`std` must be positive, got {std}")
    return {"shape": [channels, *size], "mean": mean, "std": std}


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str
                ) -> dict[str, torch.Tensor]:
    """``state`` converted to the network's dtypes, after checking it holds exactly the
    network's tensors (missing, unexpected and mis-shaped ones are named) and only finite
    values. A missing BatchNorm ``num_batches_tracked`` counter is taken from the network."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(
        expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:SHOWN])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:SHOWN])})")
        if wrong:
            shown = ", ".join(f"{k}: file {tuple(state[k].shape)}, network "
                              f"{tuple(expected[k].shape)}" for k in wrong[:SHOWN])
            parts.append(f"{len(wrong)} of another shape ({shown})")
        raise ModelLegoError(
            f"{source}: the state dict does not fit the network: " + "; ".join(parts)
            + "; check the architecture and its `kwargs` (e.g. num_classes)")
    out = {}
    for k, ref in expected.items():
        value = state.get(k, ref)
        if value.is_floating_point() != ref.is_floating_point():
            raise ModelLegoError(f"{source}: tensor {k} is {value.dtype}, the network holds "
                                 f"{ref.dtype} there")
        value = value.to(ref.dtype)
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelLegoError(f"{source}: tensor {k} contains NaN or infinite values")
        out[k] = value
    return out


def import_model(weights: str | Path, config: ImportConfig, *, data_dir: Any = None,
                 command: str | None = None, fingerprint: bool = True
                 ) -> tuple[nn.Module, Manifest, ImportReport]:
    """The network of ``config.architecture`` with the state dict of ``weights``, its model
    manifest and a report (the checks made and, with ``config.evaluate``, its test accuracy).

    Args:
        weights: the state dict (``.safetensors`` or a ``torch.save`` file of tensors).
        config: the architecture, dataset and input contract.
        data_dir: where the dataset's files are.
        command: the command line recorded in the provenance.
        fingerprint: give the network its router fingerprint.

    Returns:
        ``(model, manifest, report)``.

    With ``config.evaluate`` and ``fingerprint``, the manifest gets the network's router
    fingerprint (kept with the network for :func:`modellego.save_model`); without
    ``config.evaluate`` no data is read, so there is none.

    >>> model, manifest, report = import_model(
    ...     "resnet18.safetensors", ImportConfig("torchvision:resnet18", "fashion-mnist",
    ...                                          input_size=(28, 28)))
    >>> manifest.architecture.name, manifest.dataset.name
    ('torchvision:resnet18', 'fashion-mnist')
    """
    config.validate()
    # a folder of images is read at the network's input size (no second resize)
    size = (int(config.input_size[0]), int(config.input_size[1])) \
        if config.input_size and is_folder(config.dataset) else None
    info = dataset_info(config.dataset, data_dir=data_dir, image_size=size)
    classes = tuple(int(c) for c in config.classes) if config.classes is not None \
        else tuple(range(info.num_classes))
    check_classes(classes, info.num_classes, "`classes`")
    state = read_state_dict(weights)
    kwargs = builder_kwargs(config, info, len(classes))
    model = build_architecture(config.architecture, kwargs).eval()
    channels = input_channels(model) or info.input_shape[0]
    if channels != info.input_shape[0] and 1 not in (channels, info.input_shape[0]):
        raise ModelLegoError(
            f"the network reads {channels}-channel images and {info.name!r} has "
            f"{info.input_shape[0]} channels; only grey <-> colour conversions are defined")
    contract = input_contract(config, info, channels)
    load_state(model, check_state(model, state, str(weights)))
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, *contract["shape"]))
        except Exception as exc:  # the user's network on the recorded input
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelLegoError(
                f"the network does not run on input {contract['shape']} "
                f"({type(exc).__name__}: {text[:160]}); give the size it was trained at "
                "with `input_size`") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelLegoError(f"the network's output is not a (batch, classes) tensor "
                             f"(got {type(out).__name__}"
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''})")
    if out.shape[1] != len(classes):
        raise ModelLegoError(
            f"the network has {out.shape[1]} outputs but {len(classes)} classes are given "
            f"({info.name} has {info.num_classes}); pass `classes` (the dataset's class ids "
            "in output order) or set num_classes in `kwargs`")
    manifest = Manifest.for_model(
        architecture={"name": config.architecture, "kwargs": kwargs},
        dataset={**info.to_dict(), "fingerprint": dataset_fingerprint(
            info.name, data_dir=data_dir, image_size=size)},
        classes=classes, input=contract, metrics={},
        provenance={"made_by": "modellego import", "command": command,
                    "weights": {"file": Path(weights).name, "sha256": file_sha256(weights)},
                    "modellego_version": __version__, "torch_version": torch.__version__})
    report = ImportReport(config.architecture, kwargs, info.name, list(classes), contract,
                          len(state), sum(p.numel() for p in model.parameters()))
    if config.evaluate:
        result = evaluate(model, manifest, data_dir=data_dir, latency=False)
        manifest = manifest.updated(metrics={"test_accuracy": result.accuracy,
                                             "test_per_class": result.per_class})
        report = replace(report, test_accuracy=result.accuracy, n=result.n,
                         flops=result.flops)
        manifest = fingerprinted(model, manifest, fingerprint, data_dir=data_dir)
    return model, manifest, report


def format_import(report: ImportReport) -> str:
    """The report of :func:`import_model` as the CLI prints it."""
    inp = report.input
    lines = [f"imported {report.architecture} for {report.dataset} "
             f"({len(report.classes)} classes, {report.tensors} tensors, "
             f"{report.params:,} params)",
             f"  input        {inp['shape'][0]}x{inp['shape'][1]}x{inp['shape'][2]}, "
             f"mean {inp['mean']}, std {inp['std']}"]
    if report.test_accuracy is not None:
        lines.append(f"  test accuracy {report.test_accuracy:.4f} ({report.n} images)")
    return "\n".join(lines)
