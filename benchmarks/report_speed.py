"""How long `moemerge report` takes and how large its page is, for 200 texts of 256 tokens on the demo model
(SmolLM2-135M + the three shipped LoRA experts, examples/demo_recipe.yaml), on CPU, in its two parts:

- routing: `routing.route` on each text, one forward pass of the MoE with router logits (what `report`,
  `route` and `eval` all run); timed on the first `--route-texts` texts and scaled to 200 when fewer;
- the page: everything else `report` does for 200 texts (token spans, band experts, request decisions,
  heatmaps, for a labelled set the evaluation's tables and plots, writing the file), with the routings
  computed above handed in (the 200 texts are the routed ones repeated when fewer were routed), as plain
  texts and as a labelled set.

Wall time depends on what else the machine runs; CPU time (user + system of this process, in --threads
torch threads) much less, so both are given. Texts: the shipped domain texts (examples/texts/,
examples/domains.py), each cut to its first 256 tokens, the domains in turn.

    python benchmarks/report_speed.py       # writes benchmarks/results/report_speed.json, docs/results/report_speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from domains import DOMAINS, domain_texts  # noqa: E402

from moemerge import MergeOptions, merge  # noqa: E402
from moemerge.tools import evaluate, report  # noqa: E402
from moemerge.tools.routing import load_moe, route  # noqa: E402

TEXTS = 200
TOKENS = 256
LIMIT_S, LIMIT_MB = 60, 10  # the targets: under a minute, under 10 MB


def texts_of_tokens(tokenizer, count: int, tokens: int) -> list[tuple[str, int]]:
    """`count` (text, domain) pairs, each the first `tokens` tokens of a shipped text long enough to have them,
    taken from the domains in turn."""
    pools = [
        [t for split in ("heldout", "prompts", "train") for t in domain_texts(domain, split, 120, chars=2000)]
        for domain in DOMAINS
    ]
    chosen: list[tuple[str, int]] = []
    index = [0] * len(DOMAINS)
    while len(chosen) < count:
        domain = len(chosen) % len(DOMAINS)
        text = pools[domain][index[domain]]
        index[domain] += 1
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            chosen.append((tokenizer.decode(ids[:tokens]), domain))
    return chosen


def timed(work: Callable[[], object]) -> tuple[object, float, float]:
    """What `work` returns, its wall seconds and its CPU seconds (this process, every thread)."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-report"))
    parser.add_argument("--route-texts", type=int, default=TEXTS, help="texts routed (the rest repeat them)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "report_speed.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results" / "report_speed.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.workdir / "demo-moe"
    if not (out / "moemerge.json").is_file():
        merge(ROOT / "examples" / "demo_recipe.yaml", out, MergeOptions(device="cpu", force=True))
    model, tokenizer, names = load_moe(out, torch.device("cpu"))
    routed = texts_of_tokens(tokenizer, min(args.route_texts, TEXTS), TOKENS)
    routings, route_wall, route_cpu = timed(lambda: {text: route(model, tokenizer, text) for text, _ in routed})
    pairs = [routed[i % len(routed)] for i in range(TEXTS)]
    scale = TEXTS / len(routed)

    def cached(_model, _tokenizer, text):
        return routings[text]

    rows = [
        {
            "part": f"routing ({len(routed)} texts timed, ×{scale:g})",
            "wall_s": route_wall * scale,
            "cpu_s": route_cpu * scale,
            "mb": None,
        }
    ]
    page = args.workdir / "report.html"
    for name, labelled in (("page, texts", None), ("page, labelled set", pairs)):
        texts = [text for text, _ in pairs]

        def build(labelled=labelled, texts=texts):
            report.write_page(report.build_report(out, model, tokenizer, names, texts, labelled), page)

        with mock.patch.object(report, "route", cached), mock.patch.object(evaluate, "route", cached):
            _, wall, cpu = timed(build)
        rows.append({"part": name, "wall_s": wall, "cpu_s": cpu, "mb": page.stat().st_size / 1e6})
    invocation = "python benchmarks/report_speed.py " + shlex.join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"{os.cpu_count()} cores, {args.threads} torch thread(s), 1-minute load average {os.getloadavg()[0]:.1f} "
        "at the end"
    )
    data = {"invocation": invocation, "date": date, "machine": machine, "rows": rows}
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    args.markdown.write_text(markdown(data))
    print(markdown(data))


def markdown(data: dict) -> str:
    """The table the docs quote, from the JSON this script writes."""
    lines = [
        f"`{data['invocation']}` — {data['date']}, {data['machine']}; {TEXTS} texts of {TOKENS} tokens, demo model",
        "",
        "| part | wall s | CPU s | page MB |",
        "|---|---|---|---|",
    ]
    for row in data["rows"]:
        size = "—" if row["mb"] is None else f"{row['mb']:.2f}"
        lines.append(f"| {row['part']} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {size} |")
    lines += ["", f"(targets for the whole report: under {LIMIT_S} s, under {LIMIT_MB} MB)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
