"""Sample selection and the per-class relative-contribution profile of every layer."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelLegoError
from .contribution import accumulate_class_contribution, layer_contribution
from .hooks import forward_hooks, preserved_state


@dataclass(frozen=True)
class SampleSelection:
    """The training samples chosen for each class: the ``k`` most confidently correct ones.

    ``indices[c]`` are positions in the split the selection was made from, best first;
    ``scores[c]`` the matching true-class softmax probabilities.
    """

    classes: tuple[int, ...]
    k: int
    indices: dict[int, tuple[int, ...]]
    scores: dict[int, tuple[float, ...]]

    def to_dict(self) -> dict:
        return {"classes": list(self.classes), "k": self.k,
                "indices": {str(c): list(v) for c, v in self.indices.items()},
                "scores": {str(c): list(v) for c, v in self.scores.items()}}

    def all_indices(self) -> torch.Tensor:
        return torch.tensor([i for c in self.classes for i in self.indices[c]],
                            dtype=torch.long)


@torch.inference_mode()
def select_samples(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                   classes: Sequence[int], output_classes: Sequence[int], *, k: int = 50,
                   batch_size: int = 500) -> SampleSelection:
    """For each class in ``classes``, the ``k`` samples with the highest true-class probability.

    ``images`` are normalised model inputs, ``labels`` class ids; ``output_classes[i]`` is
    the class id of output ``i``. Ties are broken by sample index (lower first).
    """
    if k < 1:
        raise ModelLegoError(f"--samples-per-class must be >= 1, got {k}")
    output_classes = list(output_classes)
    indices, scores = {}, {}
    with preserved_state(model):
        model.eval()
        for c in classes:
            pos = (labels == c).nonzero().flatten()
            if len(pos) == 0:
                raise ModelLegoError(f"class {c} has no training samples to select from")
            col = output_classes.index(c)
            probs = []
            for start in range(0, len(pos), batch_size):
                logits = model(images[pos[start:start + batch_size]]).double()
                probs.append(torch.softmax(logits, 1)[:, col])
            p = torch.cat(probs)
            order = torch.sort(-p, stable=True).indices[:k]
            indices[int(c)] = tuple(int(i) for i in pos[order])
            scores[int(c)] = tuple(float(v) for v in p[order])
    return SampleSelection(tuple(int(c) for c in classes), k, indices, scores)


@dataclass(frozen=True)
class ContributionProfile:
    """``layers[name][i]`` is ``S_c[q, p]`` for class ``classes[i]``: the summed positive
    relative contribution of input ``p`` to output ``q`` over the class's samples."""

    classes: tuple[int, ...]
    layers: dict[str, torch.Tensor]
    samples: dict[int, int]
    seconds: float
    #: per layer ``(Q, P)``: signed contribution of input p to output q, per output position,
    #: averaged over all profiled samples (used to compensate removed inputs in the bias)
    means: dict[str, torch.Tensor] = field(default_factory=dict)

    def for_class(self, layer: str, c: int) -> torch.Tensor:
        return self.layers[layer][self.classes.index(c)]

    def save(self, path: str | Path) -> None:
        meta = {"classes": list(self.classes), "samples": {str(k): v for k, v in
                                                           self.samples.items()},
                "seconds": self.seconds}
        tensors = {f"S.{k}": v.contiguous() for k, v in self.layers.items()}
        tensors.update({f"mean.{k}": v.contiguous() for k, v in self.means.items()})
        save_file(tensors, str(path), metadata={"modellego.profile": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> ContributionProfile:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["modellego.profile"])
        tensors = load_file(str(path))
        layers = {k[2:]: v for k, v in tensors.items() if k.startswith("S.")}
        means = {k[5:]: v for k, v in tensors.items() if k.startswith("mean.")}
        return cls(tuple(meta["classes"]), layers,
                   {int(k): v for k, v in meta["samples"].items()}, meta["seconds"], means)


def contribution_profile(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor,
                         labels: torch.Tensor, classes: Sequence[int], *,
                         batch_size: int = 64) -> ContributionProfile:
    """Run ``images`` through ``model`` once and accumulate every layer's class contributions.

    ``layers`` maps names to the conv/linear modules to profile; ``labels`` are class ids,
    all of them in ``classes``. Hooks are removed and the model's mode restored even if the
    forward pass raises.
    """
    classes = tuple(int(c) for c in classes)
    row = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    row[torch.tensor(classes)] = torch.arange(len(classes))
    rows = row[labels]
    if (rows < 0).any():
        raise ModelLegoError("profile labels must all be among the profiled classes")
    totals: dict[str, torch.Tensor] = {}
    signed: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in layers.items()}
    current: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[id(module)]
        contrib = layer_contribution(inputs[0], module, name=name)
        acc = accumulate_class_contribution(contrib, current["rows"], len(classes))
        positions = output.numel() // (output.shape[0] * contrib.shape[1])
        mean = contrib.sum(0) / positions
        if name in totals:
            totals[name] += acc
            signed[name] += mean
        else:
            totals[name] = acc
            signed[name] = mean

    t0 = time.perf_counter()
    with preserved_state(model), forward_hooks(layers.values(), hook), torch.inference_mode():
        model.eval()
        for start in range(0, len(images), batch_size):
            current["rows"] = rows[start:start + batch_size]
            model(images[start:start + batch_size])
    seconds = time.perf_counter() - t0
    counts = torch.bincount(rows, minlength=len(classes))
    means = {k: v / max(1, len(images)) for k, v in signed.items()}
    return ContributionProfile(classes, totals, {c: int(counts[i]) for i, c in
                                                 enumerate(classes)}, seconds, means)
