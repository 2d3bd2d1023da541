"""Write docs/cli-reference.md: every command's --help, generated from the parsers."""

from pathlib import Path

from modellego.cli import reference_markdown

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "cli-reference.md"
    out.write_text(reference_markdown())
    print(f"wrote {out}")
