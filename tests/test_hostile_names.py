"""Class names and file names crafted to attack the terminal, matplotlib and the SVG files.

Names come from model files and dataset folders anyone can make: printed raw, an escape
sequence recolours the terminal or sets its title and a newline fakes output lines; a ``$``
pair is parsed as matplotlib math text (and crashed the figures); control characters make
an SVG file invalid XML.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import run_cli
from modellego.files import save_model
from modellego.terminal import printable
from modellego.training import TrainConfig, train

TITLE, RED, NEWLINE, MATH = "\x1b]0;title\x07", "\x1b[31mred", "two\nlines", r"$\frac{$"
SCRIPT = "<script>document.title='pwned'</script>"
ONERROR = "<img src=x onerror=\"document.title='pwned';document.body.append('pwned')\">"
NAMES = (TITLE, RED, NEWLINE, MATH, SCRIPT, ONERROR, "six", "seven", "eight", "nine")


def hostile_model(folder: Path) -> Path:
    """A digits simnet whose ten class names are :data:`NAMES`."""
    model, manifest = train(TrainConfig(arch="simnet", dataset="digits", epochs=1,
                                        width=0.25, batch_size=64), progress=False)
    manifest = manifest.to_dict()
    manifest["dataset"]["class_names"] = list(NAMES)
    manifest["class_names"] = list(NAMES)
    path = folder / "hostile.safetensors"
    save_model(path, model, manifest)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostile_model(tmp_path_factory.mktemp("hostile"))


def _clean(text: str) -> None:
    """No control character but the newlines ending lines."""
    assert not [ch for ch in text if ch != "\n" and not ch.isprintable()], repr(text)


# --------------------------------------------------------------------------- terminal


def test_printable_escapes_exactly_the_control_characters() -> None:
    assert printable(TITLE) == r"\x1b]0;title\x07"
    assert printable(RED + "\r\t\x7f\x9b") == r"\x1b[31mred\r\t\x7f\x9b"
    assert printable(NEWLINE) == r"two\nlines"
    assert printable("evil\u202etxt.exe\u2028") == r"evil\u202etxt.exe\u2028"
    plain = "T-shirt/top é 猫 C:\\data $x$ <b>"
    assert printable(plain) == plain
    assert printable(printable(TITLE)) == printable(TITLE)  # idempotent


def test_class_names_are_printed_escaped(hostile: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(["evaluate", hostile, "--no-latency"])
    assert code == 0, err
    _clean(out)
    lines = out.splitlines()
    assert len(lines) == 4 + 10  # header, three numbers, one line per class: nothing faked
    assert lines[4].startswith(f"    class   0 {printable(TITLE):<14s} ")
    assert lines[5].startswith(f"    class   1 {printable(RED):<14s} ")
    assert lines[6].startswith(r"    class   2 two\nlines     ")

    code, out, err = run_cli(["disassemble", hostile, "--classes", "0,1,2",
                              "--out", tmp_path / "c.safetensors"])
    assert code == 0, err
    _clean(out)
    rows = [line for line in out.splitlines() if line.startswith("      ") and "." in line]
    assert [row.split()[1] for row in rows] == [r"\x1b]0;title\x07", r"\x1b[31mred",
                                                r"two\nlines"]


def test_file_names_are_printed_escaped(hostile: Path, tmp_path: Path) -> None:
    missing = tmp_path / "a\nmodellego evaluate: ok\x1b[2J.safetensors"
    code, out, err = run_cli(["evaluate", missing])
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("modellego evaluate: error: "), err
    _clean(err)
    assert r"a\nmodellego evaluate: ok\x1b[2J.safetensors" in err

    out_file = tmp_path / "part\n\x1b[1mwrote.safetensors"
    code, out, err = run_cli(["disassemble", hostile, "--classes", "3,4", "--out", out_file])
    assert code == 0, err
    _clean(out)
    assert out.splitlines()[-1] == f"wrote {printable(out_file)}"
    assert out_file.is_file()


# --------------------------------------------------------------------------- figures


def test_math_syntax_in_class_names_draws_plainly(hostile: Path, tmp_path: Path) -> None:
    # used to raise a ValueError traceback from matplotlib's math text parser; --html did
    # so after the model and the JSON report were written
    route, heat = tmp_path / "route.png", tmp_path / "heat.png"
    assert run_cli(["route", hostile, "--classes", "2,3", "--samples-per-class", "5",
                    "--out", route])[0] == 0
    assert run_cli(["heatmap", hostile, "--layer", "fc", "--classes", "2,3",
                    "--samples-per-class", "5", "--out", heat])[0] == 0
    outs = [tmp_path / n for n in ("c.safetensors", "c.json", "c.html")]
    code, _, err = run_cli(["disassemble", hostile, "--classes", "3,0", "--out", outs[0],
                            "--report", outs[1], "--html", outs[2]])
    assert code == 0, err
    for path in [route, heat, *outs]:
        assert path.stat().st_size > 500, path


def test_a_page_that_fails_to_render_leaves_no_outputs(hostile: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    import modellego.viz.report as report

    class Boom(RuntimeError):
        pass

    def fail(*args: object, **kwargs: object) -> str:
        raise Boom("the figure cannot be drawn")

    monkeypatch.setattr(report, "disassembly_html", fail)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(Boom):
        run_cli(["disassemble", hostile, "--classes", "3,0", "--out", out / "c.safetensors",
                 "--report", out / "c.json", "--html", out / "c.html"])
    assert list(out.iterdir()) == []  # not a model and a report without their page


def _svg_texts(path: Path) -> list[str]:
    root = ET.parse(path).getroot()  # used to fail: control characters are not XML
    return ["".join(el.itertext()) for el in root.iter("{http://www.w3.org/2000/svg}text")]


def test_svg_figures_are_well_formed_and_show_escaped_names(hostile: Path,
                                                            tmp_path: Path) -> None:
    import matplotlib

    route, heat = tmp_path / "route.svg", tmp_path / "heat.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as <text>, not paths
        assert run_cli(["route", hostile, "--classes", "0,1,2,3", "--samples-per-class", "5",
                        "--out", route])[0] == 0
        assert run_cli(["heatmap", hostile, "--layer", "fc", "--classes", "0,1,2,3",
                        "--samples-per-class", "5", "--out", heat])[0] == 0
    legend = _svg_texts(route)
    for cls, name in enumerate(NAMES[:4]):
        assert f"class {cls} only ({printable(name)})" in legend, legend
    ticks = _svg_texts(heat)
    for cls, name in enumerate(NAMES[:4]):
        assert f"{cls} ({printable(name)})" in ticks, ticks
    # with the default fonttype (glyph paths, text kept in comments) the file parses too
    assert run_cli(["route", hostile, "--classes", "0,1", "--samples-per-class", "5",
                    "--out", tmp_path / "paths.svg"])[0] == 0
    ET.parse(tmp_path / "paths.svg")
