"""The residual stream of a vision transformer: what cutting it would cost, measured.

The channel graph keeps a ViT's residual stream whole (LayerNorm normalises over it, and the
position embedding runs along it); issue 30 asks to decide from measurements whether the
default should instead remove stream channels consistently in every block, slicing the
LayerNorms. This measures that alternative on the shipped Fashion-MNIST ViT without
building it: for each task of ``benchmarks/transformers.py``, the ``k`` stream channels
that the task uses least (the task's contribution shares to every layer that reads the
stream and is profiled: the MLPs' first layers and the head, summed) are set to zero
everywhere, and every LayerNorm computes its mean and variance over the kept channels only,
as a sliced LayerNorm would; nothing is re-fitted. Beside it, ``k`` channels drawn at
random (seeded), and the FLOPs share such a network would keep (every layer that reads or
writes the stream shrinks by ``k / width``; the attention products do not).

    .venv/bin/python benchmarks/stream.py

Writes benchmarks/results/stream.json. Every figure is measured in this run.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from modellego import DisassemblyConfig, __version__, disassemble
from modellego.analysis.locate import profiled_layers
from modellego.data import load_split, normalize
from modellego.files import load_model
from modellego.metrics import macs_by_layer

ROOT = Path(__file__).resolve().parent.parent
VIT = ROOT / "checkpoints" / "fashion-mnist" / "vit.safetensors"
TASKS = [(0, 1, 2), (1, 7), (0, 2, 4, 6, 8), (3, 4, 5, 6, 7, 8, 9)]
CUTS = (2, 4, 8, 12, 16, 24)


def stream_ranking(model: nn.Module, manifest, task: tuple[int, ...]) -> torch.Tensor:
    """The stream channels, least used by ``task`` first: each profiled layer that reads the
    stream contributes its rows' normalised contribution shares, per class of the task (the
    profile of a paper-preset disassembly: 50 samples per class)."""
    comp, _, _ = disassemble(model, manifest, DisassemblyConfig.paper(task),
                             source_path=VIT, fingerprint=False)
    width = model.pos_embed.shape[-1]
    use = torch.zeros(width, dtype=torch.float64)
    modules = dict(model.named_modules())
    for lay in profiled_layers(comp.graph):
        mod = modules[lay.name]
        if not isinstance(mod, nn.Linear) or mod.in_features != width:
            continue
        for c in task:
            S = comp.profile.for_class(lay.name, c).double().reshape(mod.out_features, -1)
            use += (S / S.sum(1, keepdim=True).clamp_min(1e-300)).sum(0) / S.shape[0]
    return torch.sort(use, stable=True).indices


@torch.no_grad()
def cut_logits(model: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The zoo ViT's forward with the stream's removed channels zero and every LayerNorm's
    statistics taken over the kept channels (what slicing the stream would compute)."""
    m = keep.to(x.dtype)

    def norm(t: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
        kept = t[..., keep]
        mu = kept.mean(-1, keepdim=True)
        var = kept.var(-1, unbiased=False, keepdim=True)
        return ((t - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias) * m

    t = model.patch_embed(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + model.pos_embed
    t = t * m
    for block in model.blocks:
        t = t + block.attn(norm(t, block.norm1)) * m
        t = t + block.mlp(norm(t, block.norm2)) * m
    return model.head(norm(t, model.norm)[:, 0])


def flops_share(model: nn.Module, shape: tuple[int, ...], k: int) -> float:
    """The FLOPs share left when ``k`` stream channels go: the layers that read or write the
    stream (patch embedding, q/k/v and output projections, the MLPs, the head) shrink by
    ``k / width``; the attention products (per head) and the rest do not."""
    width = model.pos_embed.shape[-1]
    macs = macs_by_layer(model, shape)
    touching = sum(v for name, v in macs.items()
                   if name == "patch_embed" or name == "head" or
                   name.endswith((".attn.qkv", ".attn.proj", ".mlp.0", ".mlp.2")))
    total = sum(macs.values())
    return (total - touching * k / width) / total


def main() -> int:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, manifest = load_model(VIT)
    model.eval()
    test = load_split("fashion-mnist", "test")
    width = int(model.pos_embed.shape[-1])
    rows = []
    print(f"stream width {width}; accuracy change (pp, restricted to the task, test split) "
          "when k channels go, no repair")
    print("task                    k   least used   random   FLOPs kept")
    for task in TASKS:
        part = test.subset(list(task))
        x = normalize(part.images, part.info)
        y = torch.tensor([task.index(int(v)) for v in part.labels])
        order = stream_ranking(model, manifest, task)

        def accuracy(keep: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y,
                     task: tuple[int, ...] = task) -> float:
            logits = cut_logits(model, x, keep)[:, list(task)]
            return float((logits.argmax(1) == y).double().mean())

        base = accuracy(torch.ones(width, dtype=torch.bool))
        gen = torch.Generator().manual_seed(0)
        for k in CUTS:
            least = torch.ones(width, dtype=torch.bool)
            least[order[:k]] = False
            rand = torch.ones(width, dtype=torch.bool)
            rand[torch.randperm(width, generator=gen)[:k]] = False
            row = {"task": list(task), "k": k, "share_cut": k / width,
                   "restricted_accuracy": base,
                   "least_used_delta_pp": 100 * (accuracy(least) - base),
                   "random_delta_pp": 100 * (accuracy(rand) - base),
                   "flops_kept": flops_share(model, manifest.input.shape, k)}
            rows.append(row)
            print(f"{str(list(task)):<22} {k:>3} {row['least_used_delta_pp']:>+11.2f} "
                  f"{row['random_delta_pp']:>+8.2f} {100 * row['flops_kept']:>10.1f} %",
                  flush=True)
    result = {"modellego_version": __version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
              "source": str(VIT.relative_to(ROOT)), "width": width, "rows": rows,
              "seconds": time.perf_counter() - t0}
    out = ROOT / "benchmarks" / "results" / "stream.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
