"""Routers side by side with pytorch-ood's out-of-distribution detectors.

    .venv/bin/pip install 'pytorch-ood==0.4.0'   # a benchmark-only dependency
    .venv/bin/python benchmarks/routers.py [--quick | --cases a,d] [--ours-from FILE]

On the cases of benchmarks/assembly.py (the same parts, components made the same way), every
detector below is fitted on each part's own calibration images -- the very images our routers
are fitted on (``AssemblyConfig()``'s seeded 3000 training images per class, all of a class's
images where it has fewer) -- and used as
that part's routing score, combined as ``calibrated`` combines its scores: each part's score
standardised on the calibration images, one weight and bias per part fitted by logistic
regression to predict the owning part, ``log softmax`` of the routes added to each part's
``log softmax`` logits. Feature detectors read the input of the part's last linear layer
(its penultimate features), logit detectors its logits.

Detectors (pytorch-ood 0.4.0): Mahalanobis, RMD (relative Mahalanobis), KNN (k = 50, the
library's default), ViM (d = min(64, D // 2)), EnergyBased (EBO), MaxLogit, GEN, fDBD,
NNGuide (k = 10). Ours: joint (the default), calibrated, and fingerprint (data-free: no
calibration image at all). For each: routing AUROC (mean over pairs of parts), routing
accuracy and the assembled balanced accuracy on the union of the parts' test sets.
``--ours-from benchmarks/results/assembly-routing.json`` takes our three routers' rows from
that run of benchmarks/assembly.py (the same parts, calibration images and test sets; it
must hold every case asked for) instead of assembling them again, which on the five-part
case alone takes a quarter of an hour. Writes benchmarks/results/routers.json
(routers-quick.json with --quick, routers-subset.json with --cases).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from assembly import fingerprinted, make_cases  # noqa: E402  (the sibling benchmark)

from modellego import __version__  # noqa: E402
from modellego.assembly import (  # noqa: E402
    AssemblyConfig,
    evaluate_assembly,
    union_test_set,
)
from modellego.assembly.routing import routing_metrics  # noqa: E402
from modellego.assembly.scoring import FeatureTap, fit_router_weights  # noqa: E402
from modellego.workflows.assembly import (  # noqa: E402
    as_parts,
    assemble,
    calibration_images,
)

ROOT = Path(__file__).resolve().parent.parent
OURS = ("joint", "calibrated", "fingerprint")


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    name, layer = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    return name, layer


def detectors(head: nn.Linear) -> dict:
    """name -> (fit(features, labels), score(features, logits) -> typicality, higher = own)."""
    from pytorch_ood.detector import (
        GEN,
        KNN,
        RMD,
        EnergyBased,
        Mahalanobis,
        MaxLogit,
        NNGuide,
        ViM,
        fDBD,
    )

    w, b = head.weight.detach().float(), head.bias.detach().float()
    d = min(64, w.shape[1] // 2)
    feature = {"Mahalanobis": lambda: Mahalanobis(None), "RMD": lambda: RMD(None),
               "KNN": lambda: KNN(None), "ViM": lambda: ViM(None, d=max(1, d), w=w, b=b),
               "fDBD": lambda: fDBD(None, head=head), "NNGuide": lambda: NNGuide(None, head=head)}
    logit = {"EBO": EnergyBased.score, "MaxLogit": MaxLogit.score, "GEN": GEN.score}
    out = {}
    for name, make in feature.items():
        out[name] = ("features", make)
    for name, score in logit.items():
        out[name] = ("logits", score)
    return out


@torch.inference_mode()
def outputs(model, k: int, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Part ``k``'s logits and penultimate features on contract images ``x``."""
    part, adapter = model.body.parts[k], model.body.adapters[k]
    tap = FeatureTap(part, [layer])
    logits, feats = [], []
    for i in range(0, len(x), 500):
        lg, (f,) = tap(adapter(x[i:i + 500]))
        logits.append(lg.float())
        feats.append(f.float())
    return torch.cat(logits), torch.cat(feats)


def combined(scores_cal: list[torch.Tensor], scores_test: list[torch.Tensor],
             owner_cal: torch.Tensor, test_logits: list[torch.Tensor], columns) -> torch.Tensor:
    """The assembled logits on the test images when part k's routing score is
    ``scores[k]``, combined as ``calibrated`` combines its scores."""
    zs_cal, zs_test = [], []
    for sc, st in zip(scores_cal, scores_test):
        mean, std = sc.mean(), sc.std().clamp_min(1e-6)
        zs_cal.append(((sc - mean) / std)[:, None])
        zs_test.append(((st - mean) / std)[:, None])
    w, bias = fit_router_weights(zs_cal, owner_cal)
    routes = torch.stack([(z * w[k]).sum(1) + bias[k] for k, z in enumerate(zs_test)], 1)
    log_route = torch.log_softmax(routes, 1)
    return torch.cat([torch.log_softmax(lg, 1)[:, cols] + log_route[:, k:k + 1]
                      for k, (lg, cols) in enumerate(zip(test_logits, columns))], 1)


def router_row(balanced_accuracy: float, routing: dict) -> dict:
    """A router's row: the assembled balanced accuracy, and of ``routing`` (as
    :func:`routing_metrics` gives it) the routing accuracy and the pair AUROCs with their
    mean."""
    pairs = list(routing["auroc_pairs"].values())
    return {"balanced_accuracy": balanced_accuracy,
            "routing_accuracy": routing["routing_accuracy"],
            "auroc_mean_pairs": sum(pairs) / len(pairs), "auroc_pairs": routing["auroc_pairs"]}


def summary(logits: torch.Tensor, y: torch.Tensor, blocks) -> dict:
    pred = logits.argmax(1)
    per = [float((pred[y == c] == c).double().mean()) for c in range(logits.shape[1])]
    return router_row(sum(per) / len(per), routing_metrics(logits, y, blocks))


def ours_from(path: Path, names: list[str]) -> tuple[str | None, dict[str, dict]]:
    """The date of a benchmarks/assembly.py result file and, per case of ``names``, its
    Base and our routers' rows."""
    data = json.loads(path.read_text())
    cases = {c["case"]: c for c in data.get("cases", [])}
    missing = [n for n in names if n not in cases
               or not set(OURS) <= set(cases[n].get("scalings", {}))]
    if missing:
        raise SystemExit(f"{path}: no {', '.join(OURS)} rows for case(s) "
                         f"{', '.join(missing)}; run benchmarks/assembly.py for them first")
    out = {}
    for n in names:
        evs = cases[n]["scalings"]
        out[n] = {"base": cases[n]["base"], "routers": {
            s: {**router_row(evs[s]["balanced_accuracy"], evs[s]["routing"]), "ours": True,
                "from": path.name} for s in OURS}}
    return data.get("date"), out


def run_case(name: str, parts: list[Path], tmp: Path, ours: dict | None = None) -> dict:
    """Every detector on case ``name``, beside our routers (assembled here, or ``ours``: their
    rows from :func:`ours_from`)."""
    print(f"== case {name}: " + " + ".join(p.name for p in parts), flush=True)
    row: dict = {"case": name, "routers": {}}
    if ours is not None:
        row["base"] = ours["base"]
        row["routers"].update(ours["routers"])
    else:
        fingerprinted_parts = [fingerprinted(tmp, p) for p in parts]  # for `fingerprint`
        for scaling in OURS:
            model, man, _ = assemble(fingerprinted_parts, AssemblyConfig(scaling=scaling),
                                     evaluate=False)
            ev = evaluate_assembly(model, man).to_dict()
            r = row["routers"][scaling] = {**router_row(ev["balanced_accuracy"],
                                                        ev["routing"]), "ours": True}
            row["base"] = ev["base"]
            print(f"  {scaling:<12} balanced {r['balanced_accuracy']:.4f} routing "
                  f"{r['routing_accuracy']:.4f} AUROC {r['auroc_mean_pairs']:.4f}", flush=True)
    model, man, _ = assemble(parts, AssemblyConfig(scaling="none"), evaluate=False)
    cal = calibration_images(as_parts(parts), AssemblyConfig())
    x_cal = torch.cat([x for x, _ in cal])
    owner_cal = torch.cat([torch.full((len(x),), k, dtype=torch.long)
                           for k, (x, _) in enumerate(cal)])
    x_test, y_test = union_test_set(man)
    assert man.assembly is not None
    blocks = [[i for i, lab in enumerate(man.assembly.labels) if lab.part == k]
              for k in range(len(parts))]
    per_part = []
    for k, net in enumerate(model.body.parts):
        layer, head = _last_linear(net)
        own_logits, own_feats = outputs(model, k, cal[k][0], layer)
        cal_out = outputs(model, k, x_cal, layer)
        test_out = outputs(model, k, x_test, layer)
        per_part.append((head, cal[k][1], own_feats, cal_out, test_out))
    columns = [model.part_columns(k) for k in range(len(parts))]
    test_logits = [p[4][0] for p in per_part]
    for det in detectors(per_part[0][0]):
        t0 = time.perf_counter()
        try:
            s_cal, s_test = [], []
            for head, y_own, own_feats, (cal_lg, cal_f), (test_lg, test_f) in per_part:
                kind, make = detectors(head)[det]
                if kind == "features":
                    d = make().fit_features(own_feats, y_own)
                    s_cal.append(-d.predict_features(cal_f).double())
                    s_test.append(-d.predict_features(test_f).double())
                else:
                    s_cal.append(-make(cal_lg).double())
                    s_test.append(-make(test_lg).double())
            logits = combined([s.float() for s in s_cal], [s.float() for s in s_test],
                              owner_cal, test_logits, columns)
            result = summary(logits, y_test, blocks)
        except Exception as exc:  # a detector that cannot serve a part: say so in the table
            result = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        result["seconds"] = time.perf_counter() - t0
        row["routers"][det] = result
        if "error" in result:
            print(f"  {det:<12} failed: {result['error']}", flush=True)
        else:
            print(f"  {det:<12} balanced {result['balanced_accuracy']:.4f} routing "
                  f"{result['routing_accuracy']:.4f} AUROC {result['auroc_mean_pairs']:.4f}",
                  flush=True)
    peers = {k: v for k, v in row["routers"].items() if not v.get("ours") and "error" not in v}
    best_peer_acc = max((v["balanced_accuracy"] for v in peers.values()), default=0.0)
    best_peer_auroc = max((v["auroc_mean_pairs"] for v in peers.values()), default=0.0)
    default = row["routers"]["joint"]
    row["best_peer_balanced_accuracy"] = best_peer_acc
    row["best_peer_auroc"] = best_peer_auroc
    row["joint_beats_every_peer"] = bool(default["balanced_accuracy"] >= best_peer_acc
                                         and default["auroc_mean_pairs"] >= best_peer_auroc)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="cases a and c1 only")
    parser.add_argument("--cases", default=None, metavar="a,d",
                        help="only these cases (writes routers-subset.json)")
    parser.add_argument("--ours-from", type=Path, default=None, metavar="FILE",
                        help="our routers' rows from this benchmarks/assembly.py result")
    args = parser.parse_args()
    wanted = set(args.cases.split(",")) if args.cases else None
    if args.quick and wanted is not None:
        parser.error("give one of --quick and --cases")
    import pytorch_ood

    t0 = time.perf_counter()
    result = {"modellego_version": __version__, "torch": torch.__version__,
              "pytorch_ood": pytorch_ood.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"), "cases": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cases = make_cases(tmp, args.quick, wanted=wanted)
        ours = None
        if args.ours_from is not None:
            date, ours = ours_from(args.ours_from, [n for n, _, _ in cases])
            result["ours_from"] = {"file": str(args.ours_from), "date": date}
        for name, parts, _ in cases:
            result["cases"].append(run_case(name, parts, tmp,
                                            None if ours is None else ours[name]))
    result["seconds"] = time.perf_counter() - t0
    out = ROOT / "benchmarks" / "results" / ("routers-quick.json" if args.quick else
                                             "routers-subset.json" if wanted else
                                             "routers.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
