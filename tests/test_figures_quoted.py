"""Figures come from scripts: every table a benchmark wrote to docs/results/ is quoted verbatim in the docs."""

from __future__ import annotations

from pathlib import Path

from support.paths import ROOT


def test_each_results_table_is_quoted_verbatim():
    docs = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    tables = sorted((ROOT / "docs" / "results").glob("*.md"))
    assert tables
    for table in tables:
        assert table.read_text(encoding="utf-8").strip() in docs, f"{table.name} is not quoted verbatim"


def test_each_figure_is_shown_and_drawn_by_the_command_the_docs_quote(tmp_path):
    """Every PNG in docs/figures/ is shown in the docs and comes from a quoted script command that reads the
    benchmark's JSON only (nothing is run again); run here into a temporary folder, each writes a PNG."""
    import re
    import subprocess
    import sys

    from PIL import Image

    docs = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    commands = dict(re.findall(r"`python (benchmarks/\S+\.py [^`]*--figure (docs/figures/\S+\.png))`", docs))
    figures = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "figures").glob("*.png"))
    assert figures and sorted(commands.values()) == figures
    for command, figure in commands.items():
        assert f"]({figure.removeprefix('docs/')})" in docs, f"{figure} is not shown"
        target = tmp_path / Path(figure).name
        args = command.replace(figure, str(target)).split()
        run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        with Image.open(target) as made, Image.open(ROOT / figure) as shipped:
            assert made.format == "PNG" and made.width > 300 and shipped.format == "PNG"
