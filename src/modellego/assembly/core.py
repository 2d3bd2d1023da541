"""Assembly: several models or components -> one classifier over the union of their labels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, cast

import torch
from torch import nn

from .._version import __version__
from ..data.lazy import as_tensor, default_batch
from ..data.registry import check_one_folder, load_split_for
from ..errors import ModelLegoError
from ..files import open_model
from ..kinds import build_from_manifest
from ..metrics import count_flops, count_params, predict_logits
from ..models.sources import trusted
from ..provenance import require_single
from ..runtime.distributed import SINGLE, DistContext
from ..runtime.hooks import preserved_state
from .adapters import InputAdapter, contract_shape, convert_images
from .layouts import LAYOUT_REGISTRY, ParallelBody, get_layout
from .routing import routing_metrics
from .scalings import SCALING_REGISTRY, default_scaling, get_scaling
from .scoring import pooled

#: the registered layouts' and scalings' names (see :mod:`.layouts`, :mod:`.scalings`)
LAYOUTS = LAYOUT_REGISTRY.names()
SCALINGS = SCALING_REGISTRY.names()
DUPLICATES = ("error", "replace")
_PART_KEYS = ("kind", "architecture", "plan", "head", "dataset", "classes", "class_names",
              "input")


@dataclass(frozen=True)
class AssemblyConfig:
    """How to assemble; calibration uses ``calibration_samples`` training images per class."""

    layout: str = "parallel"
    #: ``None``: :func:`~modellego.assembly.scalings.default_scaling` of the parts
    #: (``concern`` when a part has a one-vs-rest head, else ``joint``)
    scaling: str | None = None
    on_duplicate: str = "error"
    calibration_samples: int = 3000
    max_taps: int = 8
    seed: int = 0

    def validate(self) -> None:
        for name, allowed in (("layout", LAYOUTS), ("scaling", SCALINGS),
                              ("on_duplicate", DUPLICATES)):
            value = getattr(self, name)
            if value not in allowed and not (name == "scaling" and value is None):
                raise ModelLegoError(f"--{name.replace('_', '-')} must be one of "
                                     f"{', '.join(allowed)}, got {value!r}")
        if self.calibration_samples < 2:
            raise ModelLegoError("`calibration_samples` must be >= 2")
        get_layout(self.layout).check(get_scaling(self.scaling or "joint"))


def label_map(parts: Sequence[dict[str, Any]], on_duplicate: str
              ) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The assembled outputs (in order) and, per part, which of its outputs are kept.

    A label is a (dataset, class id) pair. With ``on_duplicate="replace"`` a later part's
    output replaces an earlier part's output for the same label.
    """
    owner: dict[tuple[str, int], tuple[int, int]] = {}
    for k, man in enumerate(parts):
        ds = man["dataset"]["name"]
        for i, c in enumerate(man["classes"]):
            key = (ds, int(c))
            if key in owner and on_duplicate == "error":
                raise ModelLegoError(
                    f"part {owner[key][0]} and part {k} both classify {ds} class {c} "
                    f"({man['class_names'][i]}); pass `on_duplicate` replace to keep the "
                    "later part's output for it")
            owner[key] = (k, i)
    columns: list[list[int]] = [[] for _ in parts]
    labels = []
    for k, man in enumerate(parts):
        ds = man["dataset"]["name"]
        for i, c in enumerate(man["classes"]):
            if owner[(ds, int(c))] == (k, i):
                columns[k].append(i)
                labels.append({"dataset": ds, "class": int(c), "name": man["class_names"][i],
                               "part": k, "part_output": i})
    return labels, columns


class AssembledModel(nn.Module):
    """Runs every part on its adapted input and combines the (scaled) outputs.

    ``body`` returns one ``(outputs, features)`` pair per part; ``columns`` select each part's
    outputs that the assembly keeps; the scaling (:mod:`.scalings`) combines them.
    ``heads[k]``: part ``k`` answers with one-vs-rest concern scores.
    """

    def __init__(self, body: nn.Module, columns: Sequence[Sequence[int]], scaling: str,
                 routers: Sequence[nn.Module] | None = None,
                 heads: Sequence[bool] | None = None) -> None:
        super().__init__()
        self.body = body
        self.scaling = scaling
        self.rule = get_scaling(scaling)
        self.num_parts = len(columns)
        self.heads = list(heads) if heads is not None else [False] * len(columns)
        for k, cols in enumerate(columns):
            self.register_buffer(f"columns{k}", torch.tensor(list(cols), dtype=torch.long))
            self.register_buffer(f"scale{k}", torch.ones(len(cols)))
        self.routers = nn.ModuleList(routers or [])
        #: the kept outputs come from the manifest's labels: a file must hold exactly these
        self.fixed_buffers = tuple(f"columns{k}" for k in range(len(columns)))

    def part_columns(self, k: int) -> torch.Tensor:
        """The outputs of part ``k`` the assembly keeps."""
        return getattr(self, f"columns{k}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.body(x))

    def combine(self, outs: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> torch.Tensor:
        """The assembled logits from the body's per-part ``(logits, features)``."""
        return self.rule.combine(self, outs)


def _part_manifest(man: dict[str, Any], path: str | None) -> dict[str, Any]:
    from ..io import file_sha256

    part = {k: man[k] for k in _PART_KEYS if k in man}
    part["file"] = str(path) if path else None
    part["sha256"] = file_sha256(path) if path else None
    if man.get("kind") == "component":
        source = man.get("provenance", {}).get("source", {})
        part["source"] = {"file": source.get("file"), "sha256": source.get("sha256")}
    return part


def _calibration_data(parts: list[dict[str, Any]], config: AssemblyConfig,
                      contract: Sequence[int], data_dir: str | None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per part: contract images and output indices of random training images of its classes.

    Training split only: the test split is never used for calibration.
    """
    gen = torch.Generator().manual_seed(config.seed)
    data = []
    for k, man in enumerate(parts):
        split = load_split_for(man["dataset"], "train", data_dir=data_dir, where=f"part {k}")
        xs, ys = [], []
        for i, c in enumerate(man["classes"]):
            pos = (split.labels == c).nonzero().flatten()
            if len(pos) == 0:
                raise ModelLegoError(f"no training images of class {c} in "
                                     f"{man['dataset']['name']} to calibrate with")
            pick = pos[torch.randperm(len(pos), generator=gen)[:config.calibration_samples]]
            xs.append(as_tensor(split.images[pick], "the router's calibration"))
            ys.append(torch.full((len(pick),), i, dtype=torch.long))
        x = convert_images(torch.cat(xs), contract[0], contract[1:])
        data.append((x, torch.cat(ys)))
    return data


def _structure(parts: list[dict[str, Any]], nets: list[nn.Module], config: AssemblyConfig,
               contract: Sequence[int], columns: list[list[int]],
               taps: list[list[str]] | None, spec: dict[str, Any] | None, *,
               weights: bool) -> AssembledModel:
    if config.scaling is None:  # assemble() resolves it; a manifest records it resolved
        raise ModelLegoError("unknown scaling None; use one of "
                             f"{', '.join(SCALING_REGISTRY.names())}")
    scaling = get_scaling(config.scaling)
    adapters = [InputAdapter(contract, p["input"]) for p in parts]
    body = get_layout(config.layout).body(adapters, nets, parts, taps, spec, weights=weights)
    return AssembledModel(body, columns, scaling.name, scaling.routers(nets, taps, parts),
                          [bool(p.get("head")) for p in parts])


def assemble(sources: Sequence[str | Path | tuple],
             config: AssemblyConfig | None = None, *, data_dir: str | None = None,
             command: str | None = None, dist: DistContext = SINGLE,
             trust_code: Sequence[str] | str | None = None
             ) -> tuple[AssembledModel, dict[str, Any]]:
    """Assemble model files (or ``(model, manifest)`` pairs, or ``(model, manifest,
    fingerprint tensors)``) into one classifier.

    Scaling ``fingerprint`` (``--data-free``) routes with the parts' router fingerprints
    alone (:mod:`.fingerprint`) and reads no dataset.

    ``trust_code``: modules that files with ``python:`` architectures may import (see
    :func:`modellego.open_model`).

    >>> model, manifest = assemble(["a.safetensors", "b.safetensors"])
    """
    with trusted(trust_code):
        return _assemble(sources, config, data_dir=data_dir, command=command, dist=dist)


def _assemble(sources: Sequence[str | Path | tuple],
              config: AssemblyConfig | None, *, data_dir: str | None,
              command: str | None, dist: DistContext) -> tuple[AssembledModel, dict[str, Any]]:
    config = config or AssemblyConfig()
    config.validate()
    if len(sources) < 2:
        raise ModelLegoError("assembly needs at least two parts")
    nets, parts = [], []
    for src in sources:
        fingerprint = None
        if isinstance(src, (str, Path)):
            loaded = open_model(src)
            net, man = loaded.model, loaded.manifest.to_dict()
            fingerprint, path = loaded.fingerprint, str(src)
        else:  # (model, manifest) or (model, manifest, fingerprint tensors)
            net, man, *rest = src
            fingerprint, path = (rest[0] if rest else None), None
        require_single(man, "assemble", where=path or "part",
                       hint="; assemble its parts instead")
        part = _part_manifest(man, path)
        part["_num_outputs"] = len(man["classes"])
        part["_fingerprint"] = fingerprint if man.get("router_fingerprint") else None
        part["router_fingerprint"] = man.get("router_fingerprint")
        made = (man.get("provenance") or {}).get("config") or {}
        part["_repairs"] = [flag for flag, key in (("--reconstruct", "reconstruct"),
                                                   ("--compensate", "compensate"),
                                                   ("--recalibrate-bn", "recalibrate_bn"))
                            if made.get(key)]  # weights changed after the cut
        nets.append(net.eval())
        parts.append(part)
    check_one_folder([p["dataset"]["name"] for p in parts], data_dir)
    labels, columns = label_map(parts, config.on_duplicate)
    if any(len(c) == 0 for c in columns):
        k = next(i for i, c in enumerate(columns) if not c)
        raise ModelLegoError(f"part {k} has no outputs left after `on_duplicate` replace; "
                             "drop it from the assembly")
    scaling_name = config.scaling
    if scaling_name is None:  # recorded resolved, as if it had been given
        scaling_name = default_scaling(parts)
        config = replace(config, scaling=scaling_name)
        config.validate()
    layout, scaling = get_layout(config.layout), get_scaling(scaling_name)
    layout.check_parts(parts)
    scaling.check_parts(parts)
    contract = contract_shape([p["input"] for p in parts])
    taps = scaling.taps(nets, parts, config.max_taps)
    spec = layout.spec(parts)
    model = _structure(parts, nets, config, contract, columns, taps, spec, weights=True).eval()
    # a scaling that does not calibrate reads no training images (``fingerprint``: none at all)
    data = _calibration_data(parts, config, contract, data_dir) if scaling.calibrates else []
    calib = scaling.fit(model, nets, parts, data, config, taps, dist)
    for p in parts:
        p.pop("_num_outputs")
        p.pop("_fingerprint")
        p.pop("_repairs")
        p.pop("router_fingerprint", None)
    base = None
    if not layout.body_is_parts:
        per_class = _parts_base(nets, {"parts": parts, "labels": labels}, data_dir)
        base = {"per_class": per_class, "measured_on": "each component alone, test split"}
    # every layout's body keeps the parts' input adapters in a ModuleList ``adapters``
    adapters = cast("Sequence[InputAdapter]", model.body.adapters)
    manifest = {
        "kind": "assembly",
        "layout": config.layout,
        "scaling": config.scaling,
        "parts": parts,
        "taps": taps,
        "union": spec,
        "base": base,
        "labels": labels,
        "classes": list(range(len(labels))),
        "class_names": [f"{lab['dataset']}:{lab['name']}" for lab in labels],
        "input": {"shape": list(contract), "mean": [0.0] * contract[0],
                  "std": [1.0] * contract[0], "range": "[0, 1]",
                  "adapters": [a.describe() for a in adapters]},
        "provenance": {"made_by": "modellego assemble", "command": command,
                       "config": {k: v for k, v in config.__dict__.items()},
                       "calibration": calib, "modellego_version": __version__},
    }
    return model, manifest


def build_assembly(manifest: Mapping[str, Any]) -> nn.Module:
    parts = [dict(p) for p in manifest["parts"]]
    nets = [build_from_manifest(p).eval() for p in parts]
    for p in parts:
        p["_num_outputs"] = len(p["classes"])
    columns: list[list[int]] = [[] for _ in parts]
    for lab in manifest["labels"]:
        columns[lab["part"]].append(lab["part_output"])
    config = AssemblyConfig(layout=manifest["layout"], scaling=manifest["scaling"])
    return _structure(parts, nets, config, manifest["input"]["shape"], columns,
                      manifest.get("taps"), manifest.get("union"), weights=False)


def union_test_set(manifest: dict[str, Any], *, data_dir: str | None = None, split: str = "test"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract images and assembled output indices of every label's test images."""
    contract = manifest["input"]["shape"]
    by_dataset: dict[str, list[tuple[int, int]]] = {}
    specs: dict[str, tuple[int, dict[str, Any]]] = {}
    for idx, lab in enumerate(manifest["labels"]):
        by_dataset.setdefault(lab["dataset"], []).append((lab["class"], idx))
        specs.setdefault(lab["dataset"], (lab["part"], manifest["parts"][lab["part"]]["dataset"]))
    xs, ys = [], []
    for ds, pairs in by_dataset.items():
        k, spec = specs[ds]
        test = load_split_for(spec, split, data_dir=data_dir, where=f"part {k}")
        for c, idx in pairs:
            sel = test.labels == c
            xs.append(convert_images(as_tensor(test.images[sel], "the assembly's evaluation"),
                                     contract[0], contract[1:]))
            ys.append(torch.full((int(sel.sum()),), idx, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def evaluate_assembly(model: AssembledModel, manifest: dict[str, Any], *,
                      data_dir: str | None = None, batch_size: int | None = None
                      ) -> dict[str, Any]:
    """Assembled accuracy on the union of the parts' test images, and Base: the mean of the
    parts' own per-class accuracies on their own classes (argmax over each part's outputs).

    One pass: each part's raw logits give Base, the combined logits give the accuracy and
    ``routing`` (:func:`~modellego.assembly.routing.routing_metrics`: routing accuracy and
    AUROCs, and the accuracy with perfect routing, so that the loss against Base splits into
    routing and the parts' own classification).
    """
    check_one_folder([p["dataset"]["name"] for p in manifest["parts"]], data_dir)
    x, y = union_test_set(manifest, data_dir=data_dir)
    batch_size = batch_size or default_batch(x.shape[1:])
    combined: list[torch.Tensor] = []
    part_preds: list[list[torch.Tensor]] = [[] for _ in manifest["parts"]]
    with preserved_state(model), torch.inference_mode():
        model.eval()
        for i in range(0, len(x), batch_size):
            outs = model.body(x[i:i + batch_size])
            combined.append(model.combine(outs).float())
            for k, (logits, _) in enumerate(outs):
                part_preds[k].append(logits.argmax(1))
    assembled = torch.cat(combined)
    correct = assembled.argmax(1) == y
    per_label = {}
    base = {}
    for idx, lab in enumerate(manifest["labels"]):
        sel = y == idx
        key = f"{lab['dataset']}:{lab['class']}"
        per_label[key] = float(correct[sel].double().mean())
        k = lab["part"]
        own = torch.tensor(manifest["parts"][k]["classes"])[torch.cat(part_preds[k])[sel]]
        base[key] = float((own == lab["class"]).double().mean())
    if not get_layout(manifest["layout"]).body_is_parts:  # Base was measured on the parts
        base = manifest["base"]["per_class"]
    shape = manifest["input"]["shape"]
    balanced = sum(per_label.values()) / len(per_label)
    blocks = [[i for i, lab in enumerate(manifest["labels"]) if lab["part"] == k]
              for k in range(len(manifest["parts"]))]
    routing = routing_metrics(assembled, y, blocks)
    base_mean = sum(base.values()) / len(base)
    routing["routing_loss_pp"] = 100 * (routing["oracle_balanced_accuracy"] - balanced)
    routing["classification_loss_pp"] = 100 * (base_mean - routing["oracle_balanced_accuracy"])
    return {"n": int(len(y)), "accuracy": float(correct.double().mean()),
            "balanced_accuracy": balanced, "base": base_mean,
            "base_per_class": base, "per_class": per_label, "params": count_params(model),
            "flops": count_flops(model, shape), "routing": routing}


def _parts_base(nets: Sequence[nn.Module], manifest: dict[str, Any], data_dir: str | None
                ) -> dict[str, float]:
    """Each part net's accuracy on each of its kept classes (own images, own outputs)."""
    from ..data import model_input

    base = {}
    for k, part in enumerate(manifest["parts"]):
        test = load_split_for(part["dataset"], "test", data_dir=data_dir, where=f"part {k}")
        own = [lab for lab in manifest["labels"] if lab["part"] == k]
        sub = test.subset([lab["class"] for lab in own])
        logits = predict_logits(nets[k], model_input(sub.images, sub.info, part["input"]))
        pred_k = torch.tensor(part["classes"])[logits.argmax(1)]
        for lab in own:
            sel = sub.labels == lab["class"]
            base[f"{lab['dataset']}:{lab['class']}"] = float(
                (pred_k[sel] == lab["class"]).double().mean())
    return base


__all__ = ["LAYOUTS", "SCALINGS", "AssembledModel", "AssemblyConfig", "ParallelBody",
           "assemble", "evaluate_assembly", "label_map", "pooled", "union_test_set"]
