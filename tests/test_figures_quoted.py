"""Figures come from scripts: every table a benchmark wrote (docs/results/ and benchmarks/results/) is quoted
verbatim in the docs and is exactly what its script's own table function makes of its JSON, and the docs
hold no other table of figures."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
from support.paths import ROOT

RESULTS = [ROOT / "docs" / "results", ROOT / "benchmarks" / "results"]
TABLES = sorted(table for folder in RESULTS for table in folder.glob("*.md"))
FIGURE_PAGES = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md"]  # the pages that show measurements


def _docs() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])


@cache
def _script(name: str) -> ModuleType:
    """A benchmark script, imported from its file (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _json_of(table: Path) -> dict:
    found = [folder / f"{table.stem}.json" for folder in RESULTS if (folder / f"{table.stem}.json").is_file()]
    assert len(found) == 1, f"{table.name}: expected one {table.stem}.json in docs/results or benchmarks/results"
    return json.loads(found[0].read_text(encoding="utf-8"))


def _remade(table: Path) -> str:
    """The markdown the table's script writes from its JSON, by the script's own functions."""
    data = _json_of(table)
    if table.stem.startswith("merge_speed-"):
        script = _script("merge_speed")
        revisions = sorted({run["revision"] for run in data["runs"] if run["method"] == "baseline"})
        return script.report_markdown(data["summary"], data.get("pair_ratios", []), revisions)
    if table.stem == "gpu_check":
        script = _script("gpu_check")
        return script.markdown([script.Part(**part) for part in data["parts"]], data)
    if table.stem.startswith("capture_dtype-"):
        return _script("capture_dtype").markdown(data)
    if table.stem == "generated_defaults":
        return _script("generated_defaults").report(data)
    if table.stem == "fresh_setup":
        return _script("fresh_setup").markdown(data)
    if table.stem == "request_routing":
        return _script("request_routing").markdown(data)
    if table.stem.startswith("routing_quality"):
        rows = _script("routing_quality").table(data["rows"])
        return f"`{data['invocation']}` — {data['date']}, {data['machine']}\n\n{rows}\n"
    if table.stem == "expert_policies":
        preamble = [
            f"`{data['command']}` ({data['date']}; {data['runs']} run(s) × {data['heldout_per_domain']} held-out "
            "texts per domain; ± is the standard deviation over runs; 2 CPU cores shared with other jobs, 1-minute "
            f"load {data['load_1min']})",
            *data["notes"],
        ]
        return _script("expert_policies").markdown(data["rows"], preamble)
    if table.stem == "report_speed":
        return _script("report_speed").markdown(data)
    raise AssertionError(f"{table.name}: no script known to write it; add it to _remade")


def _script_tables() -> list[str]:
    """Every table a script wrote: the results' markdown files and the table offload_vs_stream keeps in its JSON."""
    tables = [table.read_text(encoding="utf-8").strip() for table in TABLES]
    offload = json.loads((ROOT / "benchmarks" / "results" / "offload_vs_stream-small.json").read_text())
    return [*tables, "\n".join(offload["table"]).strip()]


def test_each_results_table_is_quoted_verbatim():
    docs = _docs()
    assert TABLES
    for table in _script_tables():
        assert table in docs, f"not quoted verbatim:\n{table[:300]}"


@pytest.mark.parametrize("table", TABLES, ids=lambda t: f"{t.parent.parent.name}/{t.name}")
def test_each_results_table_is_what_its_script_makes_of_its_json(table):
    assert table.read_text(encoding="utf-8").strip() == _remade(table).strip()


def _table_blocks(text: str) -> list[str]:
    """The markdown tables of a page: runs of lines starting with '|'."""
    blocks, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def _has_figures(block: str) -> bool:
    """A table of figures has a cell that is a number (a reference table, such as the gate modes', has none)."""
    cells = (cell.strip() for line in block.splitlines()[2:] for cell in line.strip("|").split("|"))
    return any(re.fullmatch(r"[-+]?[\d.,]+\s*(%|x|×|s|min|GiB|MB|GB)?", cell) for cell in cells)


@pytest.mark.parametrize("page", FIGURE_PAGES, ids=lambda p: p.name)
def test_every_table_of_figures_was_written_by_a_script(page):
    written = _script_tables()
    for block in filter(_has_figures, _table_blocks(page.read_text(encoding="utf-8"))):
        assert any(block in table for table in written), f"{page.name}: a table no script wrote:\n{block[:300]}"


def test_each_figure_is_shown_and_drawn_by_the_command_the_docs_quote(tmp_path):
    """Every PNG in docs/figures/ is shown in the docs and comes from a quoted script command that reads the
    benchmark's JSON only (nothing is run again); run here into a temporary folder, each writes a PNG."""
    import subprocess

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
