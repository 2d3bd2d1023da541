"""The main job: evaluate the shipped models, take one apart, assemble a cross-dataset classifier,
export the component for deployment.

Run with ``make demo``. Writes everything under ``out/demo/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from modellego import DisassemblyConfig, disassemble
from modellego.assembly import AssemblyConfig
from modellego.errors import ModelLegoError
from modellego.files import load_model, save_model
from modellego.metrics import count_flops, count_params, cpu_latency_ms
from modellego.terminal import plain_warnings
from modellego.viz.report import disassembly_html, write_html
from modellego.viz.route import plot_route, route_from_profile
from modellego.workflows import assemble, format_assembly, format_report

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "checkpoints"
OUT = ROOT / "out" / "demo"
SHIPPED = [
    "fashion-mnist/vgg16_bn.safetensors",
    "fashion-mnist/resnet18.safetensors",
    "fashion-mnist/vgg16_bn-classes0-4.safetensors",
    "fashion-mnist/vgg16_bn-classes5-9.safetensors",
    "digits/vgg16_bn.safetensors",
    "digits/mobilenet_v2.safetensors",
]


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


def shipped_table() -> None:
    section("The shipped source models")
    print(f"{'model':<46} {'classes':>7} {'test acc.':>9} {'params':>10} {'MFLOPs':>8} "
          f"{'ms/img':>7}")
    for rel in SHIPPED:
        path = CKPT / rel
        if not path.exists():
            print(f"{rel:<46} missing (see scripts/make-checkpoints.sh)")
            continue
        model, manifest = load_model(path)
        shape = manifest.input.shape
        # accuracy as recorded by `modellego train` on the test split (`modellego evaluate`
        # recomputes it); size and latency measured now
        recorded = manifest.metrics.get("test_accuracy") if manifest.metrics else float("nan")
        print(f"{rel:<46} {len(manifest.classes):>7} "
              f"{recorded:>9.4f} {count_params(model):>10,} "
              f"{count_flops(model, shape) / 1e6:>8.2f} {cpu_latency_ms(model, shape):>7.2f}")


def take_apart(rel: str, classes: tuple[int, ...], name: str) -> Path:
    src = CKPT / rel
    model, manifest = load_model(src)
    names = [manifest.class_names[manifest.classes.index(c)] for c in classes]
    section(f"Disassemble {rel}: component for {', '.join(names)}")
    # the default: the smallest reconstructed mass-rule component within 0.5 points of the
    # restricted source at 90 % confidence
    config = DisassemblyConfig(classes)
    comp, comp_manifest, report = disassemble(model, manifest, config, source_path=src,
                                              command="scripts/demo.py")
    out = OUT / name
    save_model(out, comp.model, comp_manifest)
    print(format_report(report))
    # the decision route of the task's classes and a self-contained HTML report, both from
    # the profile the disassembly already computed
    route = route_from_profile(comp.graph, comp.profile, classes, manifest.classes,
                               comp.locate, names)
    stem = out.name.removesuffix(".safetensors")
    figure, html = OUT / f"{stem}-route.png", OUT / f"{stem}.html"
    plot_route(route, figure)
    write_html(html, disassembly_html(report, comp_manifest, route))
    for path in (out, figure, html):
        print(f"wrote {path.relative_to(ROOT)}")
    return out


def put_together(parts: list[Path]) -> None:
    section("Assemble the two components into one 6-class, 2-dataset classifier")
    for scaling in ("none", "joint"):
        model, manifest, report = assemble(parts, AssemblyConfig(scaling=scaling),
                                           command="scripts/demo.py")
        result = report.evaluation
        assert result is not None  # assemble() evaluates by default
        out = OUT / f"assembled-{scaling}.safetensors"
        save_model(out, model, manifest)
        print(f"\n-- scaling {scaling}")
        print(format_assembly(result, manifest))
        print(f"wrote {out.relative_to(ROOT)}")


def deploy(component: Path) -> None:
    from modellego import export

    section("Export the Fashion-MNIST component as ONNX, checked with onnxruntime")
    out = OUT / component.with_suffix(".onnx").name
    report = export(component, out)
    print(f"{report.exporter}: [0, 1] images (batch, {', '.join(map(str, report.input_shape))})"
          f" in, logits out; {report.channels_added} padding channels (multiples of "
          f"{report.align}); max |logit difference| on {report.check_images} "
          f"{report.check_source}: {report.max_abs_diff:.2g}")
    print(f"wrote {out.relative_to(ROOT)}")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with plain_warnings():  # the shipped 0.1.0 files warn once: no data fingerprint
            shipped_table()
            fm = take_apart("fashion-mnist/vgg16_bn.safetensors", (0, 1, 2),
                            "fm-vgg16_bn-classes0-2.safetensors")
            digits = take_apart("digits/vgg16_bn.safetensors", (7, 8, 9),
                                "digits-vgg16_bn-classes7-9.safetensors")
            put_together([fm, digits])
            deploy(fm)
    except ModelLegoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; outputs in "
          f"{OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
