"""Markdown tables for the documentation from benchmarks/results/*.json.

The tables live in the pages of ``docs/`` (``docs/results.md``, ``docs/scale.md``), each
between ``<!-- NAME-table -->`` and ``<!-- /NAME-table -->``.

    .venv/bin/python benchmarks/tables.py          # print them
    .venv/bin/python benchmarks/tables.py --docs   # write them into docs/*.md (--readme: the same)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def disassembly(data: dict) -> list[str]:
    lines = ["| model | task | method | restricted source | component | Δ (pp) | FLOPs kept "
             "(target) | params kept | validation images (one image) | targets met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["components"]:
        task = "{" + ",".join(map(str, r["task"])) + "}"
        if "error" in r:
            lines.append(f"| {r['model']} | {task} | {r['method']} | | failed: {r['error']} "
                         "| | | | | no |")
            continue
        met = "yes" if r["meets_accuracy"] and r["meets_flops"] else (
            "accuracy only" if r["meets_accuracy"] else
            ("FLOPs only" if r["meets_flops"] else "no"))
        target = f" (≤ {100 * r['flops_target']:.0f} %)" if "flops_target" in r else ""
        v = r.get("validation")
        judged = f"{v['images']} ({v['resolution_pp']:.2f} pp)" if v else ""
        lines.append(f"| {r['model']} | {task} | {r['method']} | "
                     f"{r['restricted_accuracy']:.4f} | {r['component_accuracy']:.4f} | "
                     f"{r['delta_pp']:+.2f} | {100 * r['flops_ratio']:.1f} %{target} | "
                     f"{100 * r['params_ratio']:.1f} % | {judged} | {met} |")
    for f in data.get("frontier", []):
        task = "{" + ",".join(map(str, f["task"])) + "}"
        lines += ["", f"Accuracy against FLOPs on {f['model']} {task} along the mass rule "
                      f"(β = dropped share of contribution mass; restricted source "
                      f"{f['restricted_accuracy']:.4f}; no search):", "",
                  "| β | FLOPs kept | component | Δ (pp) | + BN re-estimated | Δ (pp) |",
                  "|---|---|---|---|---|---|"]
        for p in f["points"]:
            lines.append(f"| {p['beta']} | {100 * p['flops_ratio']:.1f} % | "
                         f"{p['component_accuracy']:.4f} | "
                         f"{100 * (p['component_accuracy'] - f['restricted_accuracy']):+.2f} | "
                         f"{p['recalibrated_accuracy']:.4f} | "
                         f"{100 * (p['recalibrated_accuracy'] - f['restricted_accuracy']):+.2f}"
                         " |")
    times = {}
    for r in data["components"]:
        if "seconds" in r and r["method"] in ("paper", "default"):
            times.setdefault((r["model"], tuple(r["task"])), {})[r["method"]] = r["seconds"]
    paired = [(k, t) for k, t in times.items() if len(t) == 2]
    if paired:
        lines += ["", "Wall time of the whole command (sample selection, profile, search and "
                      "repair, test evaluation; each run alone, nothing shared):", "",
                  "| model | task | `--preset paper` (s) | default (s) | default / paper "
                  "(goal ≤ 1.5) |", "|---|---|---|---|---|"]
        for (model, task), t in paired:
            ratio = t["default"] / t["paper"]
            lines.append(f"| {model} | {{{','.join(map(str, task))}}} | {t['paper']:.1f} | "
                         f"{t['default']:.1f} | ×{ratio:.2f}"
                         f"{'' if ratio <= 1.5 else ' (missed)'} |")
    d224 = data.get("default_224")
    if d224:
        lines += ["", f"At 224 px ({d224['model']}, generated photo folder, task "
                      f"{{{','.join(map(str, d224['task']))}}}, {d224['threads']} threads, "
                      f"{d224.get('device', 'cpu')}): one plain forward pass over the "
                      f"{d224['images_read']} images the command reads "
                      f"{d224['forward_seconds']:.1f} s{_by_batch(d224)}; `--preset paper` "
                      f"{d224['paper']['seconds']:.1f} s; default "
                      f"{d224['default']['seconds']:.1f} s (×{d224['default_over_paper']:.2f} "
                      f"the paper preset, ×{d224['default_over_forward']:.2f} the forward "
                      f"pass; goal ≤ 3: {'met' if d224['meets_3x_forward'] else 'missed'})."]
    pc = data.get("profile_cost")
    if pc:
        lines += ["", f"Profile pass on {pc['model']} ({pc['samples']} samples): "
                      f"{pc['profile_seconds']:.2f} s against {pc['forward_seconds']:.2f} s for "
                      f"a plain forward pass over the same samples (×"
                      f"{pc['profile_over_forward']:.2f}); the naive unfold method would take "
                      f"≈ {pc['naive_seconds_estimated']:.0f} s (×"
                      f"{pc['naive_over_profile']:.0f} the profile; measured on "
                      f"{pc['naive_measured_on_samples']} samples and scaled; "
                      f"{pc.get('threads', '?')} threads, "
                      f"{pc.get('timing', 'one run each')})."]
    big = data.get("profile_cost_224")
    if big:
        lines += ["", _profile_line(big, f"Profile pass on {big['model']} "
                                         f"({big['samples']} samples)")]
    mem = data.get("memory")
    if mem:
        lines += ["", f"Peak RSS, ResNet-50 at 224 px, batch 32, random weights: profile pass "
                      f"{mem['profile']['peak_rss_mb'] / 1024:.2f} GB (plain forward pass "
                      f"{mem['forward']['peak_rss_mb'] / 1024:.2f} GB); target ≤ 4 GB: "
                      f"{'met' if mem['meets_4gb'] else 'missed'}."]
    return lines


def assembly(data: dict) -> list[str]:
    names = [k for k in ("none", "logit", "feature", "calibrated", "joint")
             if all(k in c["scalings"] for c in data["cases"])]
    lines = ["| case | Base | " + " | ".join(names) + " | best − Base (pp) "
             "| joint model | params | FLOPs |",
             "|---|---|" + "---|" * len(names) + "---|---|---|---|"]
    for c in data["cases"]:
        s = c["scalings"]
        best = s[c["best_scaling"]]
        joint = c.get("joint")
        jtxt = (f"{joint['balanced_accuracy']:.4f} ({joint['epochs']} ep.)" if joint else "—")
        lines.append(
            f"| {c['case']} | {c['base']:.4f} | " +
            " | ".join(f"{s[k]['balanced_accuracy']:.4f}" for k in names) +
            f" | {best['delta_vs_base_pp']:+.2f} ({c['best_scaling']}) | {jtxt} | "
            f"{best['params']:,} | {best['flops'] / 1e6:.1f} M |")
    pp = data.get("padded_vs_parallel")
    if pp:
        lines += ["", f"Padded vs parallel on (a): max |logit difference| "
                      f"{pp['max_abs_logit_diff']:.1e}; FLOPs {pp['padded_flops'] / 1e6:.1f} M "
                      f"(padded) vs {pp['parallel_flops'] / 1e6:.1f} M (parallel)."]
    return lines


def measured(data: dict) -> list[str]:
    """A table's first lines: when and with what it was measured."""
    return [f"Measured {data['date']} (torch {data['torch']}, {data['threads']} threads).", ""]


def assembly_routing(data: dict) -> list[str]:
    """Per case and scaling: balanced accuracy, routing accuracy, the accuracy with perfect
    routing, the loss split, and the routing AUROC of every pair of parts."""
    lines = [*measured(data),
             "| case | scaling | Base | assembled | routing accuracy | perfect routing | "
             "loss: routing (pp) | loss: parts (pp) | routing AUROC per pair |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in data["cases"]:
        for name, s in c["scalings"].items():
            r = s["routing"]
            pairs = ", ".join(f"{k}: {100 * v:.1f}" for k, v in r["auroc_pairs"].items())
            lines.append(f"| {c['case']} | {name} | {c['base']:.4f} | "
                         f"{s['balanced_accuracy']:.4f} | {r['routing_accuracy']:.4f} | "
                         f"{r['oracle_balanced_accuracy']:.4f} | {r['routing_loss_pp']:.2f} | "
                         f"{r['classification_loss_pp']:.2f} | {pairs} |")
    return lines


def assembly_goals(data: dict) -> list[str]:
    """Per case: the default router (joint) against its goal, the data-free router
    (fingerprint), and how much the routers fit."""
    lines = ["| case | parts | Base | joint (default) | goal | met | fingerprint (data-free) "
             "| data-free − Base (pp) | joint: numbers fitted / images | joint: assemble s "
             "| FLOPs (parts' sum) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["cases"]:
        j, f = c["scalings"]["joint"], c["scalings"]["fingerprint"]
        met = "yes" if c.get("meets_goal") else "**no**"
        lines.append(
            f"| {c['case']} | {len(c['parts'])} | {c['base']:.4f} | "
            f"{j['balanced_accuracy']:.4f} ({j['delta_vs_base_pp']:+.2f} pp) | {c['goal']} | "
            f"{met} | {f['balanced_accuracy']:.4f} | {f['delta_vs_base_pp']:+.2f} | "
            f"{j.get('router_weights', 0):,} / {j.get('fit_images', 0):,} | "
            f"{j['assemble_seconds']:.0f} | "
            f"{j['flops'] / 1e6:.1f} M ({c['parts_flops'] / 1e6:.1f} M) |")
    return lines


def assembly_subset(data: dict) -> list[str]:
    """A run of some cases and scalings (``--cases``/``--scalings``): per case and scaling,
    accuracy against Base and the goal, the routing split, and what the router fits."""
    lines = [*measured(data),
             "| case | parts | scaling | Base | assembled (balanced) | goal | met | routing "
             "accuracy | perfect routing | numbers fitted / images | assemble s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in data["cases"]:
        for name, r in c["scalings"].items():
            met = ("yes" if c.get("meets_goal") else "**no**") if name == "joint" else ""
            lines.append(
                f"| {c['case']} | {len(c['parts'])} | {name} | {c['base']:.4f} | "
                f"{r['balanced_accuracy']:.4f} ({r['delta_vs_base_pp']:+.2f} pp) | "
                f"{c['goal'] if name == 'joint' else ''} | {met} | "
                f"{r['routing']['routing_accuracy']:.4f} | "
                f"{r['routing']['oracle_balanced_accuracy']:.4f} | "
                f"{r.get('router_weights', 0):,} / {r.get('fit_images', 0):,} | "
                f"{r['assemble_seconds']:.0f} |")
    return lines


def routers(data: dict) -> list[str]:
    """Per case and router (ours, then pytorch-ood's detectors): the assembled balanced
    accuracy and the mean routing AUROC over pairs of parts."""
    names = list(data["cases"][0]["routers"])
    lines = [f"Measured {data['date']} (torch {data['torch']}, pytorch-ood "
             f"{data['pytorch_ood']}, {data['threads']} threads)"
             + (f"; our routers' rows from `{Path(data['ours_from']['file']).name}` of "
                f"{data['ours_from']['date']}" if "ours_from" in data else "")
             + ". Each cell: balanced accuracy / mean pair routing AUROC (%).", "",
             "| case | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in data["cases"]:
        cells = []
        for n in names:
            r = c["routers"].get(n, {})
            cells.append("failed" if "error" in r or not r else
                         f"{r['balanced_accuracy']:.4f} / {100 * r['auroc_mean_pairs']:.1f}")
        lines.append(f"| {c['case']} | " + " | ".join(cells) + " |")
    return lines


def scale(data: dict) -> list[str]:
    rep, dis, fwd = data["report"], data["disassemble"], data["forward"]
    return [
        f"Measured {data['date']} (torch {data['torch']}, torchvision {data['torchvision']}, "
        f"{data['cpu_threads']} threads, {data['workers']} DataLoader worker(s)): "
        f"{data['classes']} classes × {data['train_per_class']} training + "
        f"{data['test_per_class']} test JPEG photos of 224–400 px, streamed; "
        f"`--max-memory {data['max_memory']}`; "
        f"{data['classes'] - data.get('classes_profiled', data['classes'])} classes lost every "
        "training photo to the seeded validation carve and are left out.", "",
        "| step | seconds | peak RSS (main) | peak RSS (a worker) |",
        "|---|---|---|---|",
        f"| plain forward pass over the {data['forward_images']} profiled images | "
        f"{fwd['pass_seconds']:.1f} (process {fwd['seconds']:.1f}) | "
        f"{fwd['peak_rss_mib'] / 1024:.2f} GiB | {fwd['worker_peak_rss_mib'] / 1024:.2f} GiB |",
        f"| profile of {data.get('classes_profiled', data['classes'])} classes "
        f"({rep['profile_chunks']} chunks) | "
        f"{rep['profile_seconds']:.1f} | | |",
        f"| `disassemble` of those classes end to end (selection, profile, "
        f"locating, extraction, test report) | {dis['seconds']:.1f} | "
        f"{dis['peak_rss_mib'] / 1024:.2f} GiB | {dis['worker_peak_rss_mib'] / 1024:.2f} GiB |",
        "",
        f"Profile / forward pass: ×{data['profile_vs_forward']:.2f}; end-to-end disassemble / "
        f"forward pass (processes): ×{data['disassemble_vs_forward']:.2f}, or "
        f"×{data['disassemble_vs_forward_over_every_image_read']:.2f} against a forward pass "
        f"over every image the command reads (it also runs source and component over the "
        f"{rep['n']} test images for its report)."]


def distillation(data: dict) -> list[str]:
    lines = ["| teacher | student | epochs | teacher acc. | student + KD | student alone "
             "| KD − alone (pp) | params teacher → student | FLOPs teacher → student |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        t, kd, alone = r["teacher"], r["student_kd"], r["student_alone"]
        cfg = r["config"]
        lines.append(
            f"| {r['teacher_name']} | {cfg['student']} ({cfg['width']}) | {r['epochs']} | "
            f"{t['accuracy']:.4f} | {kd['accuracy']:.4f} | {alone['accuracy']:.4f} | "
            f"{100 * (kd['accuracy'] - alone['accuracy']):+.2f} | "
            f"{t['params']:,} → {kd['params']:,} | {t['flops'] / 1e6:.1f} M → "
            f"{kd['flops'] / 1e6:.2f} M |")
    cfg = data["rows"][0]["config"] if data["rows"] else {}
    if cfg:
        lines += ["", f"T = {cfg['temperature']}, α = {cfg['alpha']}, batch {cfg['batch_size']}, "
                      f"lr {cfg['lr']}, seed {cfg['seed']}; accuracy on the task's test images "
                      "(argmax over the task's classes)."]
    return lines


def strategies(data: dict) -> list[str]:
    lines = ["| model | task | strategy | restricted source | strategy acc. | Δ (pp) | FLOPs "
             "| params | time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        task = "{" + ",".join(map(str, r["task"])) + "}"
        lines.append(f"| {r['model']} | {task} | {r['strategy']} | "
                     f"{r['restricted_accuracy']:.4f} | {r['accuracy']:.4f} | "
                     f"{r['delta_pp']:+.2f} | {100 * r['flops_ratio']:.1f} % | "
                     f"{100 * r['params_ratio']:.1f} % | {r['seconds']:.0f} |")
    return lines


#: the compression table's columns: (criterion, repair) -> header
COMPRESSION_COLUMNS = {
    ("contribution", "none"): "ours", ("contribution", "bn"): "ours + BN",
    ("contribution", "rec+bn"): "ours + rec + BN", ("l1", "none"): "L1",
    ("l1", "bn"): "L1 + BN", ("l1", "rec+bn"): "L1 + rec + BN", ("fpgm", "none"): "FPGM",
    ("fpgm", "bn"): "FPGM + BN", ("fpgm", "rec+bn"): "FPGM + rec + BN",
    ("tp-l1", "bn"): "TP L1 + BN", ("tp-l2", "bn"): "TP L2 + BN",
    ("tp-taylor", "bn"): "TP Taylor + BN", ("tp-lamp", "bn"): "TP LAMP + BN"}


def _repair(r: dict) -> str:
    """A compression row's repair (rows of earlier runs name none: from their flags)."""
    if "repair" in r:
        return r["repair"]
    return ("rec+" if r.get("reconstruct") else "") + ("bn" if r.get("recalibrate_bn")
                                                       else "none")


def compression(data: dict) -> list[str]:
    cells: dict[tuple, dict] = {}
    notes: list[str] = []
    for r in data["rows"]:
        key = (r["criterion"], _repair(r))
        cells.setdefault((r["model"], r["target"]), {})[key] = r
        if "error" in r:
            keeps = re.search(r"keeps ([0-9.]+ %)", r["error"])
            note = (f"{r['model']}: the most aggressive threshold of the contribution search "
                    f"keeps {keeps.group(1)} of the FLOPs" if keeps else
                    f"{r['model']} {COMPRESSION_COLUMNS.get(key, key)}: {r['error']}")
            if note not in notes:
                notes.append(note)
    present = [k for k in COMPRESSION_COLUMNS if any(k in by for by in cells.values())]
    head = ("| model (source accuracy) | FLOPs target | β (ours) | FLOPs kept (ours / others) | "
            + " | ".join(COMPRESSION_COLUMNS[k] for k in present) + " | best |")
    lines = [head, "|---" * (head.count(" | ") + 1) + "|"]
    sources = {s["model"]: s for s in data["sources"]}
    for (model, target), by in cells.items():
        runs = [by.get(k, {"error": "not run"}) for k in present]
        ours = by.get(("contribution", "none"), {})
        other = next((r for k, r in by.items() if k[0] != "contribution" and "error" not in r),
                     {})
        flops = " / ".join("—" if "flops_ratio" not in r else f"{100 * r['flops_ratio']:.1f}"
                           for r in (ours, other)) + " %"
        done = [(r["delta_pp"], COMPRESSION_COLUMNS[k]) for k, r in zip(present, runs)
                if "error" not in r]
        best = max(done)[0] if done else None
        acc = " | ".join("—" if "error" in r else
                         (f"**{r['delta_pp']:+.2f}**" if r["delta_pp"] == best
                          else f"{r['delta_pp']:+.2f}") for r in runs)
        winner = ", ".join(name for d, name in done if d == best) if done else "—"
        beta = f"{ours['locate']['beta_conv']}" if ours.get("locate") else "—"
        lines.append(f"| {model} ({sources[model]['accuracy']:.4f}) | {target:.2f} | {beta} | "
                     f"{flops} | {acc} | {winner} |")
    if notes:
        lines += [""] + [f"Not reached — {n}." for n in notes]
    bn = max((r.get("recalibrate_bn", 0) for r in data["rows"]), default=0)
    rec = max((r.get("reconstruct", 0) for r in data["rows"]), default=0)
    lines += ["", "Points against the source on the test split (the best of a row in bold). "
                  f"BN: `--recalibrate-bn {bn}` (BatchNorm statistics re-estimated on that many "
                  f"training images); rec: `--reconstruct {rec}` (every layer reading removed "
                  "channels re-fitted by least squares on that many training images of all "
                  "classes), before BN; ours: the contribution criterion "
                  "(`--criterion contribution`); FPGM + rec + BN is `compress`'s default; TP: "
                  "Torch-Pruning's pruner with that importance at the same FLOPs, BN "
                  "re-estimated the same way."]
    return lines


def reconstruct(data: dict) -> list[str]:
    lines = [f"Mass-rule components of the shipped Fashion-MNIST models, plain cut against "
             f"`--reconstruct {data['fit_images']}` (each also with `--recalibrate-bn "
             f"{data['bn_images']}`); points against the restricted source on the task's test "
             f"images; run of {data['date']}, {data['threads']} thread, torch {data['torch']}.",
             "", "| model, task | β | FLOPs kept | plain | plain + BN | reconstructed | "
             "reconstructed + BN | repair s |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        task = "all 10" if len(r["task"]) == 10 else "{" + ",".join(map(str, r["task"])) + "}"
        lines.append(
            f"| {r['model'].split('/')[-1]} {task} ({100 * r['restricted_accuracy']:.2f} %) "
            f"| {r['beta']} | {100 * r['flops_ratio']:.1f} % | {r['plain_delta_pp']:+.2f} | "
            f"{r['plain_bn_delta_pp']:+.2f} | **{r['reconstructed_delta_pp']:+.2f}** | "
            f"{r['reconstructed_bn_delta_pp']:+.2f} | {r['repair_seconds']:.0f} |")
    return lines


def _pct(v: object) -> str:
    return f"{100 * v:.1f} %" if isinstance(v, float) else ""


def _default_cell(r: dict) -> str:
    kept = r.get("default_flops_kept")
    return r.get("default_status", "") + (f" ({_pct(kept)})" if kept is not None else "")


def _reruns(data: dict) -> str:
    """What a results file's later runs re-ran or added (``zoo.py --merge-into``)."""
    return "".join(f" Run again or added on {r['date']} ({r['threads']} thread): "
                   f"{', '.join(r['models'])}." for r in data.get("rerun", []))


def zoo(data: dict) -> list[str]:
    lines = [f"Graph steps, run of {data['date']}: torch {data['torch']}, torchvision "
             f"{data['torchvision']}, timm {data.get('timm', '-')}, {data['size']} px (some "
             f"models larger), {data['threads']} thread, {data['seconds'] / 60:.0f} min in all."
             + _reruns(data),
             "", "| source | models | pass | refused (node named) | failed | "
             "max relative Δlogit | median params kept | median FLOPs kept | default "
             "(search + repair) pass / failed | whole import + assembly ok / failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for source, s in data["summary"].items():
        rows = [r for r in data["models"] if r["source"] == source and r["status"] == "pass"]
        params = sorted(r["params_kept"] for r in rows if "params_kept" in r)
        flops = sorted(r["flops_kept"] for r in rows if "flops_kept" in r)
        lines.append(f"| {source} | {s['models']} | {s['pass']} | {s['refused']} | "
                     f"{s['failed']} | {s['max_delta_rel']:.1e} | "
                     f"{_pct(params[len(params) // 2]) if params else ''} | "
                     f"{_pct(flops[len(flops) // 2]) if flops else ''} | "
                     f"{s.get('default_pass', '-')} / {s.get('default_failed', '-')} | "
                     f"{s.get('whole_ok', '-')} / {s.get('whole_failed', '-')} |")
    refused: dict[str, list[str]] = {}
    for r in data["models"]:
        if r["status"] == "refused":
            where = f"at node `{r['node']}`" if r.get("node") else \
                "not fx-traceable (the refusal names the class)"
            refused.setdefault(where, []).append(f"{r['source']}:{r['name']}")
    lines += ["", "Refused: " + "; ".join(f"{', '.join(names)} {where}"
                                          for where, names in refused.items()) + "."
              if refused else "Refused: none."]
    failed = [r for r in data["models"] if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed: " + "; ".join(f"{r['source']}:{r['name']} ({r['reason'][:100]})"
                                             for r in failed) + "."]
    # markdown="1": MkDocs (md_in_html) renders the table inside; GitHub ignores it
    lines += ["", '<details markdown="1"><summary>Every model</summary>', "",
              "| model | status | params kept | FLOPs kept | channels frozen | rel. Δlogit | "
              "plan | default (FLOPs kept) | whole | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["models"]:
        frozen = r.get("frozen_channels")
        share = f"{100 * frozen / r['channels']:.0f} %" if frozen is not None else ""
        delta = f"{r['delta_rel']:.0e}" if "delta_rel" in r else ""
        plan = "random" if r.get("plan", "").startswith("random") else (
            "disassembly" if r.get("plan") else "")
        lines.append(f"| {r['source']}:{r['name']} | {r['status']} | "
                     f"{_pct(r.get('params_kept'))} | {_pct(r.get('flops_kept'))} | {share} | "
                     f"{delta} | {plan} | {_default_cell(r)} | {r.get('whole_status', '')} | "
                     f"{r['seconds']:.0f} |")
    return lines + ["", "</details>"]


def zoo_files(data: dict) -> list[str]:
    rows = data["models"]
    ok = sum(r.get("files_status") == "ok" for r in rows)
    skipped = sum(str(r.get("files_status", "")).startswith("skipped") for r in rows)
    tried = sum("files_status" in r for r in rows) - skipped
    lines = [f"File steps, run of {data['date']} ({data['seconds'] / 60:.0f} min): "
             f"{len(rows)} models, one or two per family; {ok} of the {tried} that reached "
             f"the file steps passed every round trip ({skipped} skipped: their in-memory "
             "component needed a random plan).", "",
             "| model | graph steps | model file | components | assembly | file steps s |",
             "|---|---|---|---|---|---|"]

    def mark(r: dict, key: str) -> str:
        return "" if key not in r else ("bit-identical" if r[key] else "CHANGED")

    for r in rows:
        status = r.get("files_status", "")
        if status.startswith("skipped"):
            files = ["skipped (random plan)", "", ""]
        else:
            files = [mark(r, "model_round_trip_equal"), mark(r, "component_round_trip_equal"),
                     mark(r, "assembly_round_trip_equal")]
        graph = r["status"] if r["status"] != "refused" else (
            f"refused at `{r['node']}`" if r.get("node") else
            f"refused: {r.get('reason', '').split(' (')[0].split(';')[0][:70]}")
        lines.append(f"| {r['source']}:{r['name']} | {graph} | {' | '.join(files)} | "
                     f"{r.get('files_seconds', '')} |")
    return lines


def zoo_default(data: dict) -> list[str]:
    """The default (search + reconstruction) and the whole-model import + assembly over the
    zoo: the models the run reached, each with its figures."""
    rows = data["models"]
    timm = f", timm {data['timm']}" if data.get("timm") else ""
    lines = [f"Run of {data['date']}: torch {data['torch']}, torchvision {data['torchvision']}"
             f"{timm}, {data['size']} px (some models larger), {data['threads']} thread, "
             f"{len(rows)} models in {data['seconds'] / 60:.0f} min "
             "(the graph checks as in the zoo table, then the default and the whole-model "
             "steps)." + _reruns(data), "",
             "| model | graph | default (search + repair) | FLOPs kept by the default | "
             "layers re-fitted | candidates | whole import + default-router assembly | "
             "seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        graph = r["status"] if r["status"] != "refused" else (
            f"refused at `{r['node']}`" if r.get("node") else
            f"refused: {r.get('reason', '').split(' (')[0].split(';')[0][:70]}")
        if r["status"] == "failed":
            graph = f"failed: {r.get('reason', '')[:80]}"
        lines.append(f"| {r['source']}:{r['name']} | {graph} | {r.get('default_status', '')} | "
                     f"{_pct(r.get('default_flops_kept'))} | {r.get('default_refitted', '')} | "
                     f"{r.get('default_candidates', '')} | {r.get('whole_status', '')} | "
                     f"{r['seconds']:.0f} |")
    return lines


def latency(data: dict) -> list[str]:
    """Source, component and compressed model: FLOPs and measured latency ratios."""
    lines = [f"Run of {data['date']}: torch {data['torch']}, onnxruntime {data['onnxruntime']}, "
             f"{data['threads']} threads, {data['machine']}, device {data['device']}; median "
             f"milliseconds per batch, speed-up = the source's time / this one's; "
             f"{data['goal_met']} of {data['goal_rows']} components with at least 3x fewer "
             f"FLOPs meet the goal (onnxruntime batch-32 speed-up x 1.5 >= FLOPs ratio).", "",
             "| model | variant | FLOPs (M) | FLOPs ratio | eager b1 | eager b32 | "
             "onnxruntime b1 | onnxruntime b32 | b32 speed-up: eager / onnxruntime / "
             "onnxruntime unpadded | goal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ms, up = r["ms"], r["speedup"]
        goal = "" if "meets_goal" not in r else ("met" if r["meets_goal"] else "missed")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['flops'] / 1e6:.1f} | "
            f"{r['flops_ratio']:.2f}x | {ms['eager_b1']:.2f} | {ms['eager_b32']:.1f} | "
            f"{ms['onnxruntime_b1']:.2f} | {ms['onnxruntime_b32']:.1f} | "
            f"{up['eager_b32']:.2f}x / {up['onnxruntime_b32']:.2f}x / "
            f"{up['onnxruntime_unaligned_b32']:.2f}x | {goal} |")
    return lines


def _profile_line(cost: dict, what: str, goal: float | None = None) -> str:
    """``what``: the profile pass's seconds against a plain forward pass's."""
    target = f"goal ≤ {goal}×; " if goal is not None else ""
    return (f"{what}: {cost['profile_seconds']:.3f} s against {cost['forward_seconds']:.3f} s "
            f"for a plain forward pass (×{cost['profile_over_forward']:.2f}; {target}"
            f"{cost['threads']} threads, {cost['timing']}).")


def _by_batch(d224: dict) -> str:
    """`` (batches of 8: 41.0 s, of 32: 58.0 s; the faster)`` where the run timed several."""
    times = d224.get("forward_seconds_by_batch")
    if not times or len(times) < 2:
        return ""
    return " (" + ", ".join(f"batches of {b}: {t:.1f} s" for b, t in times.items()) + \
        "; the faster counts)"


def transformers(data: dict) -> list[str]:
    """The FM ViT's components (accuracy, cost, latency, what they keep) and its assembly
    with the digits CNN."""
    lines = [f"Run of {data['date']}: torch {data['torch']}, {data['threads']} threads, "
             f"{data['seconds'] / 60:.0f} min in all; source `{data['source']}`.", "",
             "| task | restricted source | component | Δ (pp) | FLOPs kept (goal) | params "
             "kept | heads kept | MLP neurons kept | CPU latency (source) | goals met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["components"]:
        task = "{" + ",".join(map(str, r["task"])) + "}"
        met = "yes" if r["meets_accuracy"] and r["meets_flops"] else (
            "accuracy only" if r["meets_accuracy"] else
            ("FLOPs only" if r["meets_flops"] else "no"))
        lines.append(f"| {task} | {r['restricted_accuracy']:.4f} | "
                     f"{r['component_accuracy']:.4f} | {r['delta_pp']:+.2f} | "
                     f"{100 * r['flops_ratio']:.1f} % (≤ {100 * r['flops_target']:.0f} %) | "
                     f"{100 * r['params_ratio']:.1f} % | {100 * r['heads_kept']:.0f} % | "
                     f"{100 * r['neurons_kept']:.0f} % | {r['latency_ms']:.2f} ms "
                     f"({r['source_latency_ms']:.2f} ms) | {met} |")
    lines += ["", "Per block (heads kept of 4 / MLP neurons kept of 128):", "",
              "| task | " + " | ".join(f"block {b['block']}" for b in
                                       data["components"][0]["blocks"]) + " |",
              "|---|" + "---|" * len(data["components"][0]["blocks"])]
    for r in data["components"]:
        task = "{" + ",".join(map(str, r["task"])) + "}"
        lines.append(f"| {task} | " + " | ".join(f"{b['heads']} / {b['neurons']}"
                                                 for b in r["blocks"]) + " |")
    cost = data.get("profile_cost")
    if cost:
        lines += ["", _profile_line(cost, f"Contribution profile of {cost['samples']} "
                                          "training images", goal=1.5)]
    case = data.get("assembly")
    if case:
        row = case["scalings"]["joint"]
        lines += ["", "| assembly | accuracy | balanced | Base | Δ vs Base (pp) | goal met |",
                  "|---|---|---|---|---|---|",
                  f"| {' + '.join(case['parts'])} | {row['accuracy']:.4f} | "
                  f"{row['balanced_accuracy']:.4f} | {case['base']:.4f} | "
                  f"{row['delta_vs_base_pp']:+.2f} | {'yes' if case['meets_goal'] else 'no'} |"]
    return lines


def stream(data: dict) -> list[str]:
    """What cutting the ViT's residual stream would cost: per task and cut, the accuracy
    change (least used channels, random ones) and the FLOPs share kept."""
    lines = [f"Run of {data['date']}: torch {data['torch']}, {data['threads']} threads, "
             f"{data['seconds'] / 60:.0f} min; source `{data['source']}`, stream width "
             f"{data['width']}. Δ: test accuracy restricted to the task, against the source, "
             "no repair.", ""]
    cuts = sorted({r["k"] for r in data["rows"]})
    lines += ["| task | " + " | ".join(f"{k} cut: least used / random" for k in cuts) + " |",
              "|---|" + "---|" * len(cuts)]
    tasks: dict[str, dict[int, dict]] = {}
    for r in data["rows"]:
        tasks.setdefault("{" + ",".join(map(str, r["task"])) + "}", {})[r["k"]] = r
    for task, by_k in tasks.items():
        lines.append(f"| {task} | " + " | ".join(
            f"{by_k[k]['least_used_delta_pp']:+.2f} / {by_k[k]['random_delta_pp']:+.2f}"
            for k in cuts) + " |")
    first = next(iter(tasks.values()))
    lines.append("| FLOPs kept | " + " | ".join(f"{100 * first[k]['flops_kept']:.1f} %"
                                               for k in cuts) + " |")
    return lines


TABLES = (("transformers.json", transformers), ("zoo-transformers.json", zoo),
          ("stream.json", stream),
          ("disassembly.json", disassembly), ("assembly.json", assembly),
          ("assembly-routing.json", assembly_routing),
          ("assembly-routing.json", assembly_goals, "assembly-goals-table"),
          ("assembly-subset.json", assembly_subset),
          # the full run, where there is one, fills the table after the quick one
          ("routers-quick.json", routers, "routers-table"), ("routers.json", routers),
          ("scale.json", scale),
          ("distillation.json", distillation), ("strategies.json", strategies),
          ("compression.json", compression), ("reconstruct.json", reconstruct),
          ("zoo.json", zoo), ("zoo-files.json", zoo_files),
          ("zoo-default.json", zoo_default), ("zoo-timm-default.json", zoo_default),
          ("latency.json", latency))
DOCS = RESULTS.parent.parent / "docs"


def _figure_axes(names: list[str]):
    """A row of one panel per name, in a fixed style (SVG output made reproducible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "modellego", "font.size": 8})
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3)
    return plt, fig, axes[0]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)
    return path


def _accuracy_against_flops(plt, fig, axes, reference: str, legend: int, path: Path) -> Path:
    """Label the panels of an accuracy-against-FLOPs figure (a log scale beyond 1 pp) and
    save it."""
    for ax in axes:
        ax.set_xlabel("FLOPs kept (%)")
        ax.set_ylabel(f"Δ accuracy vs {reference} (pp)")
        ax.set_yscale("symlog", linthresh=1)
    axes[0].legend(fontsize=legend)
    return _save(plt, fig, path)


def disassembly_figure(data: dict, path: Path) -> Path:
    """Accuracy change against FLOPs kept of each method's components, one panel per
    model (every task of the benchmark a point)."""
    models = sorted({r["model"] for r in data["components"]})
    plt, fig, axes = _figure_axes(models)
    marks = {"paper": "x", "mass-search": "s", "default": "o"}
    for ax, model in zip(axes, models):
        for method, mark in marks.items():
            rows = [r for r in data["components"]
                    if r["model"] == model and r["method"] == method]
            ax.scatter([100 * r["flops_ratio"] for r in rows], [r["delta_pp"] for r in rows],
                       marker=mark, label=method, s=18)
        ax.axhline(-0.5, color="grey", lw=0.6, ls="--")
    return _accuracy_against_flops(plt, fig, axes, "restricted source", 7, path)


def compression_figure(data: dict, path: Path) -> Path:
    """Accuracy change against FLOPs kept of each criterion (with its repairs) along the
    compression budgets, one panel per model."""
    models = sorted({r["model"] for r in data["rows"]})
    plt, fig, axes = _figure_axes(models)
    for ax, model in zip(axes, models):
        rows = [r for r in data["rows"] if r["model"] == model]
        for key in sorted({(r["criterion"], r["repair"]) for r in rows}):
            if key[1] not in ("rec+bn", "bn") or (key[1] == "bn" and key[0] in
                                                   ("contribution", "l1", "fpgm")):
                continue  # ours with every repair, the peers (Torch-Pruning) with BN
            line = sorted((r["flops_ratio"], r["delta_pp"]) for r in rows
                          if (r["criterion"], r["repair"]) == key)
            ax.plot([100 * f for f, _ in line], [d for _, d in line], marker=".",
                    label=f"{key[0]} + {key[1]}", lw=0.8)
    return _accuracy_against_flops(plt, fig, axes, "source", 6, path)


def routing_figure(data: dict, path: Path) -> Path:
    """Mean pairwise routing AUROC of each router and detector, per assembly case."""
    cases = [c["case"] for c in data["cases"]]
    names = list(dict.fromkeys(n for c in data["cases"] for n in c["routers"]))
    plt, fig, axes = _figure_axes(["routing AUROC (mean over pairs of parts)"])
    ax = axes[0]
    fig.set_size_inches(8.0, 3.2)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [c["routers"].get(name, {}).get("auroc_mean_pairs") for c in data["cases"]]
        xs = [k + i * width for k, y in enumerate(ys) if y is not None]
        ax.bar(xs, [y for y in ys if y is not None], width, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))], cases)
    ax.set_xlabel("assembly case")
    ax.set_ylim(0.4, 1.0)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(plt, fig, path)


#: the figures of the results page: (results file, function, figure file under docs/)
FIGURES = (("disassembly.json", disassembly_figure, "figures/disassembly.svg"),
           ("compression.json", compression_figure, "figures/compression.svg"),
           ("routers.json", routing_figure, "figures/routing-auroc.svg"))


def draw_figures(docs: Path) -> list[Path]:
    """Draw every figure whose results file exists into ``docs``."""
    return [fn(json.loads((RESULTS / name).read_text()), docs / where)
            for name, fn, where in FIGURES if (RESULTS / name).exists()]


def fill_tables(text: str) -> str:
    """Replace every ``<!-- NAME-table -->`` ... ``<!-- /NAME-table -->`` block of a page
    with the table made from ``benchmarks/results/NAME.json``."""
    for name, fn, *named in TABLES:
        path = RESULTS / name
        tag = named[0] if named else name.removesuffix(".json") + "-table"
        start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
        if path.exists() and start in text:
            block = "\n".join([start, *fn(json.loads(path.read_text())), end])
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda m, b=block: b,
                          text, flags=re.S)
    return text


def fill_docs(docs: Path = DOCS) -> list[Path]:
    """Refill the tables of every page of ``docs``; return the pages that hold tables."""
    pages = []
    for page in sorted(docs.glob("*.md")):
        text = page.read_text()
        if not re.search(r"<!-- [\w-]+-table -->", text):
            continue
        pages.append(page)
        filled = fill_tables(text)
        if filled != text:
            page.write_text(filled)
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Make the Markdown tables of the documentation from "
                    "benchmarks/results/*.json (no benchmark is run): print them, or with "
                    "--docs write each into the page of docs/ that holds its "
                    "<!-- NAME-table --> ... <!-- /NAME-table --> block, and draw the "
                    "figures of docs/figures/.")
    parser.add_argument("--docs", "--readme", dest="docs", action="store_true",
                        help="write the tables into docs/*.md (docs/results.md, "
                             "docs/scale.md) instead of printing them; --readme is its "
                             "former name, from when they lived in README.md")
    args = parser.parse_args(argv)
    if args.docs:
        pages = fill_docs()
        root = DOCS.parent
        print("filled the tables of " + ", ".join(str(p.relative_to(root)) for p in pages))
        drawn = draw_figures(DOCS)
        print("drew " + ", ".join(str(p.relative_to(root)) for p in drawn))
        return 0
    for name, fn, *_ in TABLES:
        path = RESULTS / name
        if path.exists():
            print(f"### {name}\n")
            print("\n".join(fn(json.loads(path.read_text()))))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
