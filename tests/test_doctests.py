"""The docstring examples of the package run as doctests.

Each example runs in its module's namespace, with every name of ``modellego.__all__`` (as
after ``from modellego import *``), plus the few names the examples take as given
(``net``, ``x``, ``y``, a loaded ``model`` and ``manifest``, ...), made here from the shipped
digits network and small files written to a temporary working folder, where
``checkpoints/`` is the repository's."""
from __future__ import annotations

import doctest
import importlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import modellego as ml
from modellego.data import load_split, normalize
from modellego.models import create_model

ROOT = Path(__file__).resolve().parents[1]
DIGITS = "checkpoints/digits/mobilenet_v2.safetensors"

#: every module with a ``>>>`` example, and how many examples it has
MODULES = {
    "modellego": 1, "modellego.terminal": 1, "modellego.disassembly": 1,
    "modellego.distillation": 1, "modellego.compression": 2, "modellego.assembly.core": 1,
    "modellego.workflows.disassembly": 1, "modellego.workflows.compression": 1,
    "modellego.workflows.importing": 1, "modellego.workflows.assembly": 1,
    "modellego.surgery.reconstruct": 1, "modellego.files": 2, "modellego.models.registry": 1,
    "modellego.registry": 1, "modellego.viz.route": 1, "modellego.manifest": 3,
}


def test_every_module_with_an_example_is_listed() -> None:
    found = set()
    for path in (ROOT / "src" / "modellego").rglob("*.py"):
        if ">>> " in path.read_text(encoding="utf-8"):
            parts = path.relative_to(ROOT / "src").with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert found == set(MODULES)


@pytest.fixture(scope="module")
def namespace(tmp_path_factory) -> dict:
    """The names the examples take as given, in a working folder of their own."""
    work = tmp_path_factory.mktemp("doctests")
    (work / "checkpoints").symlink_to(ROOT / "checkpoints")
    old = os.getcwd()
    os.chdir(work)
    try:
        torch.manual_seed(0)
        split = load_split("fashion-mnist", "train")
        x, y = normalize(split.images[:600], split.info), split.labels[:600]
        net = create_model("simnet", in_channels=1, num_classes=10, input_size=28,
                           width=0.25).eval()
        model, manifest = ml.load_model(DIGITS)
        # two components of the digits network, for the assembly examples
        for name, classes in (("a", (0, 1, 2, 3, 4)), ("b", (5, 6, 7, 8, 9))):
            comp, man, _ = ml.disassemble(model, manifest,
                                          ml.DisassemblyConfig.paper(classes),
                                          fingerprint=False)
            ml.save_model(f"{name}.safetensors", comp.model, man)
        ml.save_model("t.safetensors", model, manifest)
        # a plain PyTorch user's state dict (what `import` reads)
        import torchvision
        save_file(torchvision.models.resnet18(num_classes=10).state_dict(),
                  "resnet18.safetensors")
        net_a, man_a = ml.load_model("a.safetensors")
        net_b, man_b = ml.load_model("b.safetensors")
        comp, _, _ = ml.disassemble(model, manifest, ml.DisassemblyConfig.paper((3, 4)),
                                    fingerprint=False)
        split = load_split("digits", "train")
        yield {"net": net, "x": x, "y": y, "model": model, "manifest": manifest,
               "net_a": net_a, "man_a": man_a, "net_b": net_b, "man_b": man_b,
               "plan": comp.plan, "graph": comp.graph,
               "x_train": normalize(split.images, split.info)}
    finally:
        os.chdir(old)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_the_examples_run(name: str, namespace: dict) -> None:
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module) if t.examples]
    assert sum(1 for t in tests) == MODULES[name]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        test.globs.update({n: getattr(ml, n) for n in ml.__all__})
        test.globs.update(namespace)
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0
