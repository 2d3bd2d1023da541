"""Assembly: several models or components -> one classifier over the union of their labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .._version import __version__
from ..analysis.distributed import SINGLE, DistContext, chunk_ranges, gather_chunks
from ..analysis.hooks import preserved_state
from ..data import load_split
from ..errors import ModelLegoError
from ..io import build_from_manifest, load_model, register_kind
from ..metrics import count_flops, count_params, predict_logits
from .adapters import InputAdapter, contract_shape, convert_images
from .scoring import SCALINGS, FeatureTap, Router, class_gaussians, fit_router_weights, pooled

LAYOUTS = ("parallel", "padded", "union")
DUPLICATES = ("error", "replace")
_PART_KEYS = ("kind", "architecture", "plan", "dataset", "classes", "class_names", "input")


@dataclass(frozen=True)
class AssemblyConfig:
    """How to assemble; calibration uses ``calibration_samples`` training images per class."""

    layout: str = "parallel"
    scaling: str = "calibrated"
    on_duplicate: str = "error"
    calibration_samples: int = 200
    max_taps: int = 8
    seed: int = 0

    def validate(self) -> None:
        for name, allowed in (("layout", LAYOUTS), ("scaling", SCALINGS),
                              ("on_duplicate", DUPLICATES)):
            if getattr(self, name) not in allowed:
                raise ModelLegoError(f"--{name.replace('_', '-')} must be one of "
                                     f"{', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.calibration_samples < 2:
            raise ModelLegoError("--calibration-samples must be >= 2")
        if self.layout in ("padded", "union") and self.scaling == "calibrated":
            raise ModelLegoError(f"--scaling calibrated needs each part's own features; use "
                                 f"--layout parallel, or another --scaling with "
                                 f"--layout {self.layout}")


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
                    f"({man['class_names'][i]}); pass --on-duplicate replace to keep the "
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


def tap_layers(net: nn.Module, input_shape: Sequence[int], max_taps: int) -> list[str]:
    """Up to ``max_taps`` conv/linear layers spread over the depth, always with the last one."""
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(names) <= max_taps:
        return names
    step = (len(names) - 1) / (max_taps - 1)
    return [names[round(i * step)] for i in range(max_taps)]


class AssembledModel(nn.Module):
    """Runs every part on its adapted input and concatenates the (scaled) logits.

    ``body`` returns one ``(logits, features)`` pair per part; ``columns`` select each part's
    outputs that the assembly keeps.
    """

    def __init__(self, body: nn.Module, columns: Sequence[Sequence[int]], scaling: str,
                 routers: Sequence[Router] | None = None) -> None:
        super().__init__()
        self.body = body
        self.scaling = scaling
        self.num_parts = len(columns)
        for k, cols in enumerate(columns):
            self.register_buffer(f"columns{k}", torch.tensor(list(cols), dtype=torch.long))
            self.register_buffer(f"scale{k}", torch.ones(len(cols)))
        self.routers = nn.ModuleList(routers or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.body(x))

    def combine(self, outs: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> torch.Tensor:
        """The assembled logits from the body's per-part ``(logits, features)``."""
        pieces, routes = [], []
        for k, (logits, feats) in enumerate(outs):
            cols = getattr(self, f"columns{k}")
            if self.scaling == "calibrated":
                routes.append(self.routers[k](logits, feats))
                pieces.append(torch.log_softmax(logits, 1)[:, cols])
            else:
                pieces.append(logits[:, cols] * getattr(self, f"scale{k}"))
        if routes:
            log_route = torch.log_softmax(torch.stack(routes, 1), 1)
            pieces = [p + log_route[:, k:k + 1] for k, p in enumerate(pieces)]
        return torch.cat(pieces, 1)


class ParallelBody(nn.Module):
    """Each part on its own adapted input; no FLOPs are spent on zero blocks."""

    def __init__(self, adapters: Sequence[InputAdapter], nets: Sequence[nn.Module],
                 taps: Sequence[Sequence[str]] | None = None) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(adapters)
        self.parts = nn.ModuleList(FeatureTap(n, t) for n, t in zip(nets, taps)) if taps \
            else nn.ModuleList(nets)
        self.tapped = bool(taps)

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        outs = []
        for adapter, part in zip(self.adapters, self.parts):
            out = part(adapter(x))
            outs.append(out if self.tapped else (out, []))
        return outs


def _part_manifest(man: dict[str, Any], path: str | None) -> dict[str, Any]:
    from ..io import file_sha256

    part = {k: man[k] for k in _PART_KEYS if k in man}
    part["file"] = str(path) if path else None
    part["sha256"] = file_sha256(path) if path else None
    if man.get("kind") == "component":
        source = man.get("provenance", {}).get("source", {})
        part["source"] = {"file": source.get("file"), "sha256": source.get("sha256")}
    return part


def _build_body(layout: str, parts: list[dict[str, Any]], nets: list[nn.Module],
                contract: Sequence[int], taps: list[list[str]] | None,
                union: nn.Module | None = None) -> nn.Module:
    adapters = [InputAdapter(contract, p["input"]) for p in parts]
    if layout == "union":
        from .union import UnionBody

        return UnionBody(adapters[0], union, [len(p["classes"]) for p in parts])
    if layout == "padded":
        from .padded import PaddedBody

        return PaddedBody(adapters, nets, parts)
    return ParallelBody(adapters, nets, taps)


def _calibration_data(parts: list[dict[str, Any]], config: AssemblyConfig,
                      contract: Sequence[int], data_dir: str | None
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per part: contract images and output indices of random training images of its classes.

    Training split only: the test split is never used for calibration.
    """
    gen = torch.Generator().manual_seed(config.seed)
    data = []
    for man in parts:
        split = load_split(man["dataset"]["name"], "train", data_dir=data_dir)
        xs, ys = [], []
        for i, c in enumerate(man["classes"]):
            pos = (split.labels == c).nonzero().flatten()
            if len(pos) == 0:
                raise ModelLegoError(f"no training images of class {c} in "
                                     f"{man['dataset']['name']} to calibrate with")
            pick = pos[torch.randperm(len(pos), generator=gen)[:config.calibration_samples]]
            xs.append(split.images[pick])
            ys.append(torch.full((len(pick),), i, dtype=torch.long))
        x = convert_images(torch.cat(xs), contract[0], contract[1:])
        data.append((x, torch.cat(ys)))
    return data


def _map_chunks(fn, x: torch.Tensor, dist: DistContext, chunk: int = 64
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn(x) -> (logits, [features])`` computed in fixed chunks of ``x``, chunk ``i`` on rank
    ``i % world_size``, gathered in chunk order: the same tensors for any number of ranks."""
    ranges = chunk_ranges(len(x), chunk)
    mine, dims = [], None
    for j, (start, stop) in enumerate(ranges):
        if not dist.owns(j):
            continue
        logits, feats = fn(x[start:stop])
        outs = [logits, *feats]
        dims = [t.shape[1] for t in outs]
        mine.append(torch.cat([t.double() for t in outs], 1).flatten())
    if dims is None:  # a rank without chunks still needs the widths to unpack the others
        logits, feats = fn(x[:1])
        dims = [t.shape[1] for t in (logits, *feats)]
    width = sum(dims)
    parts = gather_chunks(mine, [(stop - start) * width for start, stop in ranges], dist)
    full = torch.cat([p.view(-1, width) for p in parts]).float()
    cols = list(torch.split(full, dims, 1))
    return cols[0], cols[1:]


@torch.inference_mode()
def _fit_scaling(model: AssembledModel, nets: list[nn.Module], parts: list[dict[str, Any]],
                 data: list[tuple[torch.Tensor, torch.Tensor]], config: AssemblyConfig,
                 taps: list[list[str]] | None, dist: DistContext = SINGLE) -> dict[str, Any]:
    """Set the scaling buffers / routers of ``model`` from calibration data; returns a summary.

    Every forward pass runs in fixed chunks shared out over the ranks of ``dist``."""
    adapters = model.body.adapters
    info: dict[str, Any] = {"scaling": config.scaling}
    if config.scaling in ("logit", "feature"):
        mags = []
        for k, (net, (x, y)) in enumerate(zip(nets, data)):
            tap = FeatureTap(net, [_last_layer(net)])
            logits, feats = _map_chunks(lambda xb, t=tap, a=adapters[k]: t(a(xb)), x, dist)
            mags.append(float(feats[0].abs().mean()))
            cols = getattr(model, f"columns{k}")
            scale = torch.ones(len(cols))
            if config.scaling == "logit":
                pred = logits.argmax(1)
                for j, col in enumerate(cols.tolist()):
                    ok = (y == col) & (pred == col)
                    win = logits[ok, col]
                    if len(win) and float(win.mean()) > 0:
                        scale[j] = 1.0 / float(win.mean())
            getattr(model, f"scale{k}").copy_(scale)
        if config.scaling == "feature":
            avg = sum(mags) / len(mags)
            for k, m in enumerate(mags):
                getattr(model, f"scale{k}").fill_(avg / m if m > 0 else 1.0)
        info["feature_magnitudes"] = mags
        return info
    # calibrated: Gaussians on one half of each part's images, router on the other half
    halves = []
    for x, y in data:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed))
        # split every class in two, so that each class has fitting images (else NaN means)
        per_class = [perm[y[perm] == c] for c in range(int(y.max()) + 1)]
        halves.append((torch.cat([p[::2] for p in per_class]),
                       torch.cat([p[1::2] for p in per_class])))
    for k, (router, (x, y)) in enumerate(zip(model.routers, data)):
        fit_idx = halves[k][0]
        part = model.body.parts[k]
        _, feats = _map_chunks(lambda xb, p=part, a=adapters[k]: p(a(xb)), x[fit_idx], dist)
        for i, f in enumerate(feats):
            means, prec = class_gaussians(f, y[fit_idx], parts[k]["_num_outputs"])
            getattr(router, f"means{i}").copy_(means)
            getattr(router, f"precision{i}").copy_(prec)
    route_x = torch.cat([x[h[1]] for (x, _), h in zip(data, halves)])
    owner = torch.cat([torch.full((len(h[1]),), k, dtype=torch.long)
                       for k, h in enumerate(halves)])
    zs = []
    for k, router in enumerate(model.routers):
        part = model.body.parts[k]
        logits, feats = _map_chunks(lambda xb, p=part, a=adapters[k]: p(a(xb)), route_x, dist)
        z = router.scores(logits, feats)
        router.z_mean.copy_(z.mean(0))
        router.z_std.copy_(z.std(0).clamp_min(1e-6))
        zs.append((z - router.z_mean) / router.z_std)
    w, b = fit_router_weights(zs, owner)
    for k, router in enumerate(model.routers):
        router.weight.copy_(w[k])
        router.bias.fill_(float(b[k]))
    routed = torch.stack([(z * w[k]).sum(1) + b[k] for k, z in enumerate(zs)], 1).argmax(1)
    info["router_fit_accuracy"] = float((routed == owner).double().mean())
    info["taps"] = taps
    return info


def _last_layer(net: nn.Module) -> str:
    names = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return names[-1]


def _structure(parts: list[dict[str, Any]], nets: list[nn.Module], config: AssemblyConfig,
               contract: Sequence[int], columns: list[list[int]],
               taps: list[list[str]] | None, union: nn.Module | None = None) -> AssembledModel:
    body = _build_body(config.layout, parts, nets, contract, taps, union)
    routers = None
    if config.scaling == "calibrated":
        routers = []
        for k, net in enumerate(nets):
            dims = _tap_dims(net, taps[k])
            routers.append(Router(dims, parts[k]["_num_outputs"]))
    return AssembledModel(body, columns, config.scaling, routers)


def _tap_dims(net: nn.Module, taps: Sequence[str]) -> list[int]:
    modules = dict(net.named_modules())
    return [modules[t].in_channels if isinstance(modules[t], nn.Conv2d)
            else modules[t].in_features for t in taps]


def assemble(sources: Sequence[str | Path | tuple[nn.Module, dict[str, Any]]],
             config: AssemblyConfig | None = None, *, data_dir: str | None = None,
             command: str | None = None, dist: DistContext = SINGLE
             ) -> tuple[AssembledModel, dict[str, Any]]:
    """Assemble model files (or ``(model, manifest)`` pairs) into one classifier.

    >>> model, manifest = assemble(["a.safetensors", "b.safetensors"])
    """
    config = config or AssemblyConfig()
    config.validate()
    if len(sources) < 2:
        raise ModelLegoError("assembly needs at least two parts")
    nets, parts = [], []
    for src in sources:
        if isinstance(src, (str, Path)):
            net, man = load_model(src)
            path = str(src)
        else:
            net, man = src
            path = None
        if man.get("kind") not in ("model", "component"):
            raise ModelLegoError(f"{path or 'part'}: only models and components can be "
                                 f"assembled, not a {man.get('kind')!r}")
        part = _part_manifest(man, path)
        part["_num_outputs"] = len(man["classes"])
        nets.append(net.eval())
        parts.append(part)
    labels, columns = label_map(parts, config.on_duplicate)
    if any(len(c) == 0 for c in columns):
        k = next(i for i, c in enumerate(columns) if not c)
        raise ModelLegoError(f"part {k} has no outputs left after --on-duplicate replace; "
                             "drop it from the assembly")
    contract = contract_shape([p["input"] for p in parts])
    taps = None
    if config.scaling == "calibrated":
        taps = [tap_layers(n, p["input"]["shape"], config.max_taps) for n, p in
                zip(nets, parts)]
    union, spec = None, None
    if config.layout == "union":
        from .union import union_net, union_spec

        spec = union_spec(parts)
        union = union_net(spec, load_model(spec["source"]["file"])[0])
    model = _structure(parts, nets, config, contract, columns, taps, union).eval()
    if config.scaling == "none":  # nothing to calibrate: no training images needed
        calib = {"scaling": "none"}
    else:
        data = _calibration_data(parts, config, contract, data_dir)
        calib = _fit_scaling(model, nets, parts, data, config, taps, dist)
    for p in parts:
        p.pop("_num_outputs")
    base = None
    if config.layout == "union":
        per_class = _parts_base(nets, {"parts": parts, "labels": labels}, data_dir)
        base = {"per_class": per_class, "measured_on": "each component alone, test split"}
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
                  "adapters": [a.describe() for a in model.body.adapters]},
        "provenance": {"made_by": "modellego assemble", "command": command,
                       "config": {k: v for k, v in config.__dict__.items()},
                       "calibration": calib, "modellego_version": __version__},
    }
    return model, manifest


@register_kind("assembly")
def _build_assembly(manifest: dict[str, Any]) -> nn.Module:
    parts = [dict(p) for p in manifest["parts"]]
    nets = [build_from_manifest(p).eval() for p in parts]
    for p in parts:
        p["_num_outputs"] = len(p["classes"])
    columns: list[list[int]] = [[] for _ in parts]
    for lab in manifest["labels"]:
        columns[lab["part"]].append(lab["part_output"])
    config = AssemblyConfig(layout=manifest["layout"], scaling=manifest["scaling"])
    union = None
    if config.layout == "union":
        from .union import union_net

        union = union_net(manifest["union"])
    return _structure(parts, nets, config, manifest["input"]["shape"], columns,
                      manifest.get("taps"), union)


def union_test_set(manifest: dict[str, Any], *, data_dir: str | None = None, split: str = "test"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract images and assembled output indices of every label's test images."""
    contract = manifest["input"]["shape"]
    by_dataset: dict[str, list[tuple[int, int]]] = {}
    for idx, lab in enumerate(manifest["labels"]):
        by_dataset.setdefault(lab["dataset"], []).append((lab["class"], idx))
    xs, ys = [], []
    for ds, pairs in by_dataset.items():
        test = load_split(ds, split, data_dir=data_dir)
        for c, idx in pairs:
            sel = test.labels == c
            xs.append(convert_images(test.images[sel], contract[0], contract[1:]))
            ys.append(torch.full((int(sel.sum()),), idx, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def evaluate_assembly(model: AssembledModel, manifest: dict[str, Any], *,
                      data_dir: str | None = None, batch_size: int = 500) -> dict[str, Any]:
    """Assembled accuracy on the union of the parts' test images, and Base: the mean of the
    parts' own per-class accuracies on their own classes (argmax over each part's outputs).

    One pass: each part's raw logits give Base, the combined logits give the accuracy.
    """
    x, y = union_test_set(manifest, data_dir=data_dir)
    preds, part_preds = [], [[] for _ in manifest["parts"]]
    with preserved_state(model), torch.inference_mode():
        model.eval()
        for i in range(0, len(x), batch_size):
            outs = model.body(x[i:i + batch_size])
            preds.append(model.combine(outs).argmax(1))
            for k, (logits, _) in enumerate(outs):
                part_preds[k].append(logits.argmax(1))
    correct = torch.cat(preds) == y
    per_label = {}
    base = {}
    for idx, lab in enumerate(manifest["labels"]):
        sel = y == idx
        key = f"{lab['dataset']}:{lab['class']}"
        per_label[key] = float(correct[sel].double().mean())
        k = lab["part"]
        own = torch.tensor(manifest["parts"][k]["classes"])[torch.cat(part_preds[k])[sel]]
        base[key] = float((own == lab["class"]).double().mean())
    if manifest["layout"] == "union":  # the body is not the parts: Base was measured on them
        base = manifest["base"]["per_class"]
    shape = manifest["input"]["shape"]
    balanced = sum(per_label.values()) / len(per_label)
    return {"n": int(len(y)), "accuracy": float(correct.double().mean()),
            "balanced_accuracy": balanced, "base": sum(base.values()) / len(base),
            "base_per_class": base, "per_class": per_label, "params": count_params(model),
            "flops": count_flops(model, shape)}


def _parts_base(nets: Sequence[nn.Module], manifest: dict[str, Any], data_dir: str | None
                ) -> dict[str, float]:
    """Each part net's accuracy on each of its kept classes (own images, own outputs)."""
    from ..data import normalize

    base = {}
    for k, part in enumerate(manifest["parts"]):
        test = load_split(part["dataset"]["name"], "test", data_dir=data_dir)
        own = [lab for lab in manifest["labels"] if lab["part"] == k]
        sub = test.subset([lab["class"] for lab in own])
        logits = predict_logits(nets[k], normalize(sub.images, sub.info))
        pred_k = torch.tensor(part["classes"])[logits.argmax(1)]
        for lab in own:
            sel = sub.labels == lab["class"]
            base[f"{lab['dataset']}:{lab['class']}"] = float(
                (pred_k[sel] == lab["class"]).double().mean())
    return base


__all__ = ["AssembledModel", "AssemblyConfig", "assemble", "evaluate_assembly", "label_map",
           "pooled", "union_test_set"]
