"""The HTML reports in a real browser (headless Chromium): a disassembly and an assembly page
made from a model whose class names carry ``<script>`` and ``onerror`` payloads.

A probe script, injected into a copy of each page after the report body, records once the
page has loaded whether any payload ran (the title changed, text was appended, extra
scripts or images exist) and whether every embedded figure decoded (natural width > 0),
and writes that into the DOM, which Chromium dumps. Under CI (``CI=true``) a missing
chromium is a failure: ``make test`` installs it (scripts/ensure-chromium.sh).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import run_cli
from test_hostile_names import hostile_model

_PROBE = """<script id="probe-script">
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var appended = Array.prototype.slice.call(document.body.childNodes).filter(function (n) {
    return n.nodeType === 3 && n.textContent.indexOf("pwned") >= 0; }).length;
  var result = {title: document.title, appended: appended,
                scripts: document.scripts.length,
                images: images.map(function (im) {
                  return {alt: im.alt, complete: im.complete, width: im.naturalWidth,
                          src: im.getAttribute("src").slice(0, 22)}; })};
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is not installed; make test installs it with "
                    "scripts/ensure-chromium.sh (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium, or run make test)")


def _probe(page: Path, tmp_path: Path) -> dict:
    """Load a copy of ``page`` with the probe in headless Chromium; the probe's findings."""
    text = page.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    copy = tmp_path / f"probed-{page.name}"
    copy.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    profile = tmp_path / f"profile-{page.stem}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, ("the probe did not run", proc.stdout[-2000:], proc.stderr[-2000:])
    return json.loads(html.unescape(found.group(1)))


def _assert_inert(result: dict, title: str, figures: int) -> None:
    assert result["title"] == title  # the payloads would set it to 'pwned'
    assert result["appended"] == 0  # ... and append 'pwned' to the body
    assert result["scripts"] == 1  # the probe only: no payload became a <script>
    assert len(result["images"]) == figures, result["images"]  # no payload became an <img>
    for im in result["images"]:
        assert im["src"] == "data:image/png;base64,", im
        assert im["complete"] and im["width"] > 0, im  # the embedded figure decoded


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pages")
    model = hostile_model(folder)
    # classes 4 and 5 carry the <script> and onerror names, 3 the math-text one
    for name, classes in (("a", "4,5,3"), ("b", "0,1")):
        code, _, err = run_cli(["disassemble", model, "--classes", classes,
                                "--samples-per-class", "10",
                                "--out", folder / f"{name}.safetensors",
                                "--html", folder / f"{name}.html"])
        assert code == 0, err
    code, _, err = run_cli(["assemble", folder / "a.safetensors", folder / "b.safetensors",
                            "--scaling", "none", "--out", folder / "ab.safetensors",
                            "--html", folder / "ab.html"])
    assert code == 0, err
    return {"disassembly": folder / "a.html", "assembly": folder / "ab.html"}


def test_disassembly_report_runs_no_payload_and_shows_its_figures(pages, tmp_path: Path):
    result = _probe(pages["disassembly"], tmp_path)
    _assert_inert(result, "modellego disassembly: classes 4, 5, 3 of digits", figures=2)


def test_assembly_report_runs_no_payload_and_shows_its_figures(pages, tmp_path: Path):
    result = _probe(pages["assembly"], tmp_path)
    _assert_inert(result, "modellego assembly of 2 parts", figures=1)


def test_the_probe_sees_a_payload_that_runs(tmp_path: Path):
    # the check itself: an unescaped payload is caught
    page = tmp_path / "evil.html"
    page.write_text("<!DOCTYPE html><html><head><title>report</title></head><body>"
                    "<script>document.title='pwned'</script>"
                    "<img src=x onerror=\"document.body.append('pwned')\"></body></html>")
    result = _probe(page, tmp_path)
    assert result["title"] == "pwned" and result["appended"] == 1
    assert result["scripts"] == 2 and result["images"][0]["width"] == 0
