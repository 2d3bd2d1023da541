"""Zoo sweep: every torchvision classification builder and a set of timm CNNs and
transformers through the
channel graph and the real disassembly path, with random weights.

    OMP_NUM_THREADS=1 python benchmarks/zoo.py [--only PATTERN] [--size 64] [--skip-timm]

Per model, in order (see ``STEPS``; a step may stop the model with a status):

1. build it (``weights=None`` / ``pretrained=False``, 10 classes) and randomise the BN
   statistics, so that BN handling matters;
2. trace it and build the channel graph, or record the refusal and the node it names;
3. check the keep-everything plan reproduces the logits exactly;
4. disassemble a 2-class component with :func:`modellego.disassemble_model` (default
   contribution method and thresholds) on random images, and check that it equals the
   source with the removed input channels of every conv/linear zeroed ("masked source").

5. the default (no flags: threshold search with the confidence bound, every candidate
   repaired by closed-form reconstruction) on 100 random images, a 2-class task: it must run
   and repair exactly the layers whose inputs lost channels (column ``default``);
6. (``--files``) the file steps of ``zoo_files.py``: import, components, assembly;
7. every builder, transformers included, imported as a whole model and assembled with a
   small CNN of another dataset by the default router (column ``whole``).

Statuses: ``pass`` (both checks hold), ``refused`` (the library says which node it cannot
handle), ``failed`` (anything else: a wrong component or an unexpected error). Prints a
table and writes ``benchmarks/results/zoo.json`` (or ``zoo-PATTERN.json`` with ``--only``).
Every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import json
import platform
import re
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from modellego import DisassemblyConfig, __version__, disassemble_model
from modellego.analysis.locate import LocateConfig
from modellego.data import reading
from modellego.data.lazy import max_memory
from modellego.errors import ModelLegoError, PlanError, UnsupportedModelError
from modellego.metrics import count_flops, count_params
from modellego.models.attention import self_attention_layers
from modellego.surgery.extract import apply_plan
from modellego.surgery.graph import ChannelGraph, build_channel_graph
from modellego.surgery.plan import full_plan, plan_from_masks
from modellego.surgery.reconstruct import layers_to_refit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import graph_random_masks, masked_source_logits, randomize_bn  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from zoo_files import files_step as run_files  # noqa: E402
from zoo_files import image_folder  # noqa: E402
from zoo_files import whole_step as run_whole  # noqa: E402

#: timm CNNs, a few per family (names as in timm 1.0.31)
TIMM = ["resnet18", "resnet50d", "resnext50_32x4d", "seresnext26d_32x4d", "regnetx_002",
        "regnety_004", "efficientnet_b0", "efficientnet_lite0", "efficientnetv2_rw_t",
        "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_050",
        "mobilenetv4_conv_small", "convnext_atto", "convnext_pico", "convnextv2_atto",
        "densenet121", "dpn68", "ghostnet_100", "ghostnetv2_100", "rexnet_100",
        "mixnet_s", "mnasnet_100", "cspresnet50", "cspdarknet53", "darknet53",
        "dla34", "hrnet_w18_small", "inception_v3", "xception41", "vgg11_bn",
        "repvgg_a0", "res2net50_14w_8s", "resnest14d", "selecsls42b", "tinynet_a",
        "lcnet_050", "hardcorenas_a", "fbnetc_100", "semnasnet_050", "spnasnet_100",
        "regnetz_b16", "skresnet18", "gernet_s", "ese_vovnet19b_dw", "dm_nfnet_f0",
        "resnetv2_50", "efficientvit_b0", "mobileone_s0", "fastvit_t8",
        # transformers (issue 30), built for the sweep's input size
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
        "swin_tiny_patch4_window7_224", "beit_base_patch16_224", "eva02_tiny_patch14_224",
        "cait_xxs24_224", "pit_ti_224",
        # GroupNorm (whole groups; one group kept whole) and more families
        "resnet50_gn", "poolformer_s12", "mambaout_femto", "repvit_m0_9",
        "inception_next_tiny", "gcvit_xxtiny", "hgnetv2_b0", "starnet_s1", "hgnet_tiny",
        "rdnet_tiny", "vovnet39a", "twins_svt_small", "deit3_small_patch16_224",
        "nf_resnet26", "ecaresnet26t", "mixer_s16_224", "xcit_nano_12_p16_224",
        "coatnet_nano_rw_224", "mobilevit_xxs", "efficientformerv2_s0"]
#: timm models that take the input size as an argument (the transformers, and others)
TIMM_AT_SIZE = {"vit_tiny_patch16_224", "deit_tiny_patch16_224",
                "deit_tiny_distilled_patch16_224", "beit_base_patch16_224",
                "eva02_tiny_patch14_224", "cait_xxs24_224", "pit_ti_224", "repvit_m0_9",
                "gcvit_xxtiny", "twins_svt_small", "deit3_small_patch16_224",
                "mixer_s16_224", "xcit_nano_12_p16_224", "coatnet_nano_rw_224",
                "mobilevit_xxs", "efficientformerv2_s0"}
SIZES = {"inception_v3": 96, "maxvit_t": 224, "vit_h_14": 56, "eva02_tiny_patch14_224": 56,
         "swin_tiny_patch4_window7_224": 224}
#: the default thresholds times these, in turn, until no layer is emptied (random weights
#: can make a whole layer irrelevant, which a component cannot express)
THRESHOLD_SCALES = (1.0, 0.5, 0.25, 0.1)
#: how the library refuses a profile whose one class would not fit in its memory bound
MEMORY_REFUSAL = "the contribution profile of one class holds"
TOL = 1e-9  # max |logit difference| in float64, relative to max(1, max |logit|)


@dataclass
class Case:
    """One model going through the steps; steps fill ``row`` and may set ``stop``."""

    source: str
    name: str
    size: int
    row: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None
    graph: ChannelGraph | None = None
    images: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    stop: bool = False
    #: whether the model also goes through the file steps (``--files``)
    files: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)


def _node_of(msg: str) -> str | None:
    m = re.search(r"node '([^']+)'", msg)
    return m.group(1) if m else None


def build_step(case: Case) -> None:
    torch.manual_seed(0)
    if case.source == "torchvision":
        import torchvision
        kwargs: dict[str, Any] = {"weights": None, "num_classes": 10}
        if case.name.startswith("vit_"):
            kwargs["image_size"] = case.size
        if case.name in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = True
            kwargs["init_weights"] = False  # random init without scipy's truncnorm
        model = torchvision.models.get_model(case.name, **kwargs)
    else:
        import timm
        kwargs = {"num_classes": 10}
        if case.name in TIMM_AT_SIZE:
            kwargs["img_size"] = case.size
        model = timm.create_model(case.name, pretrained=False, **kwargs)
    case.extra["kwargs"] = kwargs
    # as modellego builds a network from a file: attention layers whose heads can be removed
    case.model = randomize_bn(self_attention_layers(model), 1).eval()
    case.row["params"] = count_params(case.model)


def graph_step(case: Case) -> None:
    assert case.model is not None
    try:
        case.graph = build_channel_graph(case.model, case.shape)
    except UnsupportedModelError as exc:
        case.row.update(status="refused", node=_node_of(str(exc)), reason=str(exc))
        case.stop = True
        return
    g = case.graph
    reasons: dict[str, int] = {}
    for s, why in g.frozen_reasons.items():
        kind = re.sub(r"[\w.]*\d[\w.]*|\(\d+ groups\)", "", why).strip()  # drop names
        reasons[kind] = reasons.get(kind, 0) + g.space_size[s]
    case.row.update(layers=len(g.layers), spaces=len(g.spaces()), ties=len(g.ties),
                    channel_params=len(g.channel_params),
                    frozen_channels=sum(g.space_size[s] for s in g.frozen_spaces),
                    channels=sum(g.space_size[s] for s in g.spaces()),
                    frozen_reasons=reasons)


def _scale(x: torch.Tensor) -> float:
    return max(1.0, x.abs().max().item())


def full_plan_step(case: Case) -> None:
    assert case.model is not None and case.graph is not None
    gen = torch.Generator().manual_seed(7)
    case.images = torch.randn(40, *case.shape, generator=gen)
    with torch.no_grad():
        src = case.model(case.images[:4])
        full = apply_plan(case.model, full_plan(case.graph)).eval()(case.images[:4])
    case.row["full_plan_delta"] = (full - src).abs().max().item()
    if case.row["full_plan_delta"] > 0:  # the same computation: bit for bit
        case.row.update(status="failed", reason="the keep-everything plan changes the logits")
        case.stop = True


def component_step(case: Case) -> None:
    assert case.model is not None and case.graph is not None and case.images is not None
    labels = torch.arange(len(case.images)) % 10
    classes = (2, 7)
    t0 = time.perf_counter()
    comp, last = None, None
    for scale in THRESHOLD_SCALES:
        base = LocateConfig()
        locate = replace(base, alpha_conv=base.alpha_conv * scale,
                         beta_conv=base.beta_conv * scale,
                         alpha_linear=base.alpha_linear * scale,
                         beta_linear=base.beta_linear * scale)
        config = DisassemblyConfig(classes, samples_per_class=4, batch_size=20, locate=locate,
                                   preset="paper")
        try:
            comp = disassemble_model(case.model, case.images, labels, classes=classes,
                                     output_classes=range(10), config=config,
                                     graph=case.graph)
            case.row["threshold_scale"] = scale
            break
        except PlanError as exc:  # the thresholds emptied a layer: try lower ones
            if "would keep no" not in str(exc):
                raise
            last = exc
    case.row["disassembly_seconds"] = time.perf_counter() - t0
    if comp is None:
        # random weights can leave a branch dead (an SE squeeze after ReLU): every
        # contribution is 0 and no threshold keeps it. The graph is still checked, on a
        # seeded random plan, and the row says so
        case.row["plan"] = f"random (disassembly: {last})"
        plan = plan_from_masks(case.graph, graph_random_masks(case.graph, 0), classes)
        model = apply_plan(case.model, plan).eval()
    else:
        case.row["plan"] = "disassembly"
        case.extra["component"] = comp  # for later steps (file round trip, assembly)
        model, plan = comp.model, comp.plan
    case.extra["component_model"], case.extra["plan"] = model, plan
    # exactness is checked in float64: random BN statistics make float32 rounding of deep
    # nets' large intermediate values visible in the logits
    x = case.images[:4].double()
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        got = net(x)
    case.model.double()
    try:
        masked = masked_source_logits(case.model, case.graph, plan, x)[:, list(classes)]
    finally:
        case.model.float()
    del net
    case.row["max_delta_logit"] = (got - masked).abs().max().item()
    case.row["delta_rel"] = case.row["max_delta_logit"] / _scale(masked)
    case.row["params_kept"] = count_params(model) / count_params(case.model)
    case.row["flops_kept"] = count_flops(model, case.shape) / \
        count_flops(case.model, case.shape)
    if case.row["delta_rel"] > TOL:
        case.row.update(status="failed", reason="component differs from the masked source")
        case.stop = True


def default_step(case: Case) -> None:
    """The default configuration on the model: search + reconstruction must run."""
    assert case.model is not None and case.graph is not None
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(100, *case.shape, generator=gen)
    labels = torch.arange(len(images)) % 10
    classes = (2, 7)
    t0 = time.perf_counter()
    try:
        comp = disassemble_model(case.model, images, labels, classes=classes,
                                 output_classes=range(10),
                                 config=DisassemblyConfig(classes, samples_per_class=3,
                                                          batch_size=20), graph=case.graph)
    except Exception as exc:  # a crash of the default is this row's failure
        case.row.update(default_status="failed", default_seconds=time.perf_counter() - t0,
                        status="failed", reason=f"default: {type(exc).__name__}: {exc}",
                        traceback=traceback.format_exc(limit=-3))
        case.stop = True
        return
    fit = comp.reconstruction
    repaired = sorted([f.name for f in fit.layers] + list(fit.skipped)) if fit else []
    expected = sorted(lay.name for lay in layers_to_refit(comp.graph, comp.plan))
    with torch.no_grad():
        finite = bool(torch.isfinite(comp.model(images[:2])).all())
    case.row.update(default_seconds=time.perf_counter() - t0,
                    default_flops_kept=count_flops(comp.model, case.shape) /
                    count_flops(case.model, case.shape),
                    default_refitted=len(fit.layers) if fit else 0,
                    default_candidates=len(comp.search))
    if repaired != expected or not finite:
        case.row.update(default_status="failed", status="failed",
                        reason="default: " + ("the repaired layers are not those whose inputs "
                                              "lost channels" if repaired != expected
                                              else "non-finite logits"))
        case.stop = True
        return
    case.row["default_status"] = "pass"


def whole_step(case: Case) -> None:
    """The whole model through files: imported with its router fingerprint, then assembled
    with a small CNN of another dataset by the default router."""
    assert case.model is not None
    data = FOLDERS.get(case.size)
    if data is None:
        data = FOLDERS[case.size] = image_folder(Path(tempfile.mkdtemp()) / "data", case.size)
    other = FOLDERS.get(-case.size)
    if other is None:
        other = FOLDERS[-case.size] = image_folder(Path(tempfile.mkdtemp()) / "other",
                                                   case.size, seed=1)
    out = run_whole(case.model, f"{case.source}:{case.name}", _file_kwargs(case), case.size,
                    data, other)
    case.row.update(out)
    if out["whole_status"] != "ok":
        case.row.update(status="failed", reason=out["whole_status"])


#: builder arguments each source gets in the model file (``weights``/``pretrained`` are the
#: sources' own business: a file never asks for downloaded weights)
def _file_kwargs(case: Case) -> dict[str, Any]:
    return {k: v for k, v in case.extra.get("kwargs", {}).items() if k != "weights"}


def files_step(case: Case) -> None:
    """Through files, as a user would: the model imported (``modellego import``) on a
    generated image folder, two 2-class components cut, saved and loaded again, and
    assembled; every round trip must give bit-identical logits."""
    assert case.model is not None
    if not case.files:
        return
    if "component" not in case.extra:  # random weights: no thresholds keep every layer
        case.row["files_status"] = "skipped: the in-memory component needed a random plan"
        return
    data = FOLDERS.get(case.size)
    if data is None:
        data = FOLDERS[case.size] = image_folder(Path(tempfile.mkdtemp()) / "data", case.size)
    out = run_files(case.model, f"{case.source}:{case.name}", _file_kwargs(case), case.size,
                    data, locate=case.extra["component"].locate)
    case.row.update(out)
    if out["files_status"] != "ok":
        case.row.update(status="failed", reason=out["files_status"])
        case.stop = True


FOLDERS: dict[int, Path] = {}

#: the steps every model goes through, in order; each takes the case and may set
#: ``case.stop`` with a status
STEPS: list[Callable[[Case], None]] = [build_step, graph_step, full_plan_step, component_step,
                                       default_step, files_step]


def run_case(source: str, name: str, size: int, files: bool = True,
             whole: bool = True) -> dict[str, Any]:
    case = Case(source, name, SIZES.get(name, size), files=files)
    case.row.update(source=source, name=name, size=case.size)
    t0 = time.perf_counter()
    try:
        for step in STEPS:
            step(case)
            if case.stop:
                break
        else:
            case.row["status"] = "pass"
    except Exception as exc:  # a benchmark records every failure and goes on
        if isinstance(exc, ModelLegoError) and str(exc).startswith(MEMORY_REFUSAL):
            # the library's bounded-memory refusal, before any pass: said, not a defect
            case.row.update(status="refused", node=None, reason=str(exc))
        else:
            case.row.update(status="failed", reason=f"{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(limit=-3))
    if whole and case.model is not None and case.row.get("status") != "failed":
        try:  # refused networks too: a whole model must import and assemble
            whole_step(case)
        except Exception as exc:
            case.row.update(status="failed", whole_status=f"failed: {type(exc).__name__}",
                            reason=f"whole: {type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(limit=-3))
    case.row["seconds"] = time.perf_counter() - t0
    return case.row


def _matches(pattern: str, source: str, name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(f"{source}:{name}", p)
               for p in pattern.split(","))


def models(args: argparse.Namespace) -> list[tuple[str, str]]:
    import torchvision
    out = [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if not args.skip_timm:
        import timm
        known = set(timm.list_models())
        out += [("timm", n) for n in TIMM if n in known]
    if args.only:
        out = [(s, n) for s, n in out if _matches(args.only, s, n)]
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source in ("torchvision", "timm"):
        mine = [r for r in rows if r["source"] == source]
        if not mine:
            continue
        deltas = [r["max_delta_logit"] for r in mine if "max_delta_logit" in r]
        rel = [r["delta_rel"] for r in mine if "delta_rel" in r]
        out[source] = {
            "models": len(mine),
            "pass": sum(r["status"] == "pass" for r in mine),
            "pass_random_plan": sum(r["status"] == "pass" and r["plan"] != "disassembly"
                                    for r in mine),
            "refused": sum(r["status"] == "refused" for r in mine),
            "failed": sum(r["status"] == "failed" for r in mine),
            "default_pass": sum(r.get("default_status") == "pass" for r in mine),
            "default_failed": sum(r.get("default_status") == "failed" for r in mine),
            "whole_ok": sum(r.get("whole_status") == "ok" for r in mine),
            "whole_failed": sum(str(r.get("whole_status", "")).startswith("failed")
                                for r in mine),
            "max_delta_logit": max(deltas) if deltas else None,
            "max_delta_rel": max(rel) if rel else None,
            "seconds": sum(r["seconds"] for r in mine)}
    return out


def _pct(v: Any) -> str:
    return f"{100 * v:5.1f}" if isinstance(v, float) else "    -"


def print_row(r: dict[str, Any]) -> None:
    frozen = r.get("frozen_channels")
    share = f"{100 * frozen / r['channels']:5.1f}" if frozen is not None else "    -"
    delta = f"{r['delta_rel']:.1e}" if "delta_rel" in r else "      -"
    note = "" if r["status"] == "pass" else (r.get("node") or "") + "  " + \
        r.get("reason", "")[:110]
    if r["status"] == "pass" and r.get("plan") != "disassembly":
        note = "random plan: " + r["plan"][8:110]
    default = r.get("default_status", "-")
    whole = "ok" if r.get("whole_status") == "ok" else ("-" if "whole_status" not in r
                                                          else "failed")
    print(f"{r['source'][:5]:5s} {r['name']:28s} {r['status']:7s} {_pct(r.get('params_kept'))} "
          f"{_pct(r.get('flops_kept'))} {share} {delta} {default:7s} "
          f"{_pct(r.get('default_flops_kept'))} {whole:6s} {r['seconds']:6.1f}  {note}",
          flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="fnmatch patterns (comma-separated) on the name or "
                        "SOURCE:NAME")
    parser.add_argument("--size", type=int, default=64, help="input size in pixels")
    parser.add_argument("--skip-timm", action="store_true", help="torchvision builders only")
    parser.add_argument("--files", default="*", metavar="PATTERN",
                        help="only these models (comma-separated patterns) also go through the "
                        "file steps (default all)")
    parser.add_argument("--whole", default="*", metavar="PATTERN",
                        help="only these models (comma-separated patterns) are also imported "
                        "whole and assembled with a small CNN (default all)")
    parser.add_argument("--out", default=None, help="results file name (default zoo.json, "
                        "or zoo-PATTERN.json with --only)")
    parser.add_argument("--merge-into", default=None, metavar="FILE",
                        help="also put this run's rows into results file FILE (replacing its "
                        "rows of the same models, summary recomputed, the models re-run "
                        "listed under 'rerun')")
    parser.add_argument("--max-memory-gib", type=float, default=None,
                        help="the library's memory bound (default its own, 4 GiB): a profile "
                        "whose one class needs more is refused")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.max_memory_gib is not None:
        with reading(max_memory=int(args.max_memory_gib * 2**30)):
            return sweep(args)
    return sweep(args)


def sweep(args: argparse.Namespace) -> int:
    import torchvision
    env = {"modellego_version": __version__, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "size": args.size, "tolerance": TOL,
           "max_memory": max_memory()}
    if not args.skip_timm:
        import timm
        env["timm"] = timm.__version__
    t0 = time.perf_counter()
    print("source name                         status  params% flops% frozen% rel|d|   "
          "default flops% whole  seconds  node / reason")
    name = args.out or ("zoo.json" if not args.only else
                        f"zoo-{re.sub(r'[^A-Za-z0-9_]+', '_', args.only).strip('_')}.json")
    out = ROOT / "benchmarks" / "results" / name
    rows: list[dict[str, Any]] = []
    for source, model_name in models(args):
        rows.append(run_case(source, model_name, args.size,
                             files=_matches(args.files, source, model_name),
                             whole=_matches(args.whole, source, model_name)))
        print_row(rows[-1])
        gc.collect()
        result = {**env, "summary": summary(rows), "models": rows,
                  "seconds": time.perf_counter() - t0}
        out.write_text(json.dumps(result, indent=2) + "\n")  # so far, after every model
    for source, s in result["summary"].items():
        print(f"{source}: {s['pass']} pass ({s['pass_random_plan']} on a random plan), "
              f"{s['refused']} refused, {s['failed']} failed of "
              f"{s['models']}; default {s['default_pass']} pass, {s['default_failed']} failed; "
              f"whole import + assembly {s['whole_ok']} ok, {s['whole_failed']} failed of "
              f"{s['models']}; max |d logit| (float64) {s['max_delta_logit']}, relative "
              f"{s['max_delta_rel']}; {s['seconds']:.0f} s")
    print(f"wrote {out.relative_to(ROOT)}")
    if args.merge_into:
        merged = merge_rows(ROOT / "benchmarks" / "results" / args.merge_into, rows, env)
        print(f"merged {len(rows)} rows into {merged.relative_to(ROOT)}")
    return 0


def merge_rows(path: Path, rows: list[dict[str, Any]], env: dict[str, Any]) -> Path:
    """Put ``rows`` into the results file ``path`` in place of its rows of the same models
    (new models appended), recompute its summary, and list each model re-run with the date
    and environment of the run that re-ran it."""
    data = json.loads(path.read_text())
    new = {(r["source"], r["name"]): r for r in rows}
    kept = [new.pop((r["source"], r["name"]), r) for r in data["models"]]
    data["models"] = kept + list(new.values())
    data["summary"] = summary(data["models"])
    data["seconds"] = sum(r["seconds"] for r in data["models"])  # (the models' steps)
    data.setdefault("rerun", []).append({
        "models": [f"{r['source']}:{r['name']}" for r in rows],
        **{k: env[k] for k in ("date", "modellego_version", "torch", "threads")},
        **({"max_memory": env["max_memory"]} if "max_memory" in env else {})})
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
