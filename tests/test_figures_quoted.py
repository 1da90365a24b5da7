"""Figures come from scripts: every table a benchmark wrote to docs/results/ is quoted verbatim in the docs."""

from __future__ import annotations

from support.paths import ROOT


def test_each_results_table_is_quoted_verbatim():
    docs = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    tables = sorted((ROOT / "docs" / "results").glob("*.md"))
    assert tables
    for table in tables:
        assert table.read_text(encoding="utf-8").strip() in docs, f"{table.name} is not quoted verbatim"
