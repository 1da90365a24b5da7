"""How long `moemerge report` takes and how large its page is, for 200 texts of 256 tokens on the demo model
(SmolLM2-135M + the three shipped LoRA experts, examples/demo_recipe.yaml), on CPU.

The texts are the shipped domain texts (examples/texts/, examples/domains.py), each cut to its first 256
tokens, 200 in all, in two runs: as plain texts (token colouring and per-text heatmaps) and as a labelled
set (`--dataset`: accuracy per layer, the label × expert matrix, evaluated once). Each run is the command
itself, timed from start to exit (imports and model loading included), `--repeats` times, alternating.

    python benchmarks/report_speed.py       # writes benchmarks/results/report_speed.json, docs/results/report_speed.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from domains import DOMAINS, domain_texts  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from moemerge import MergeOptions, merge  # noqa: E402

TEXTS = 200
TOKENS = 256
LIMIT_S, LIMIT_MB = 60, 10  # the targets: under a minute, under 10 MB


def texts_of_tokens(tokenizer, count: int, tokens: int) -> list[tuple[str, int]]:
    """`count` (text, domain) pairs, each the first `tokens` tokens of a shipped text long enough to have them,
    taken from the domains in turn."""
    pools = []
    for domain in DOMAINS:
        pool = [t for split in ("heldout", "prompts", "train") for t in domain_texts(domain, split, 120, chars=2000)]
        pools.append(pool)
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


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-report"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "report_speed.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results" / "report_speed.md")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.workdir / "demo-moe"
    if not (out / "moemerge.json").is_file():
        merge(ROOT / "examples" / "demo_recipe.yaml", out, MergeOptions(device="cpu", force=True))
    tokenizer = AutoTokenizer.from_pretrained(out)
    pairs = texts_of_tokens(tokenizer, TEXTS, TOKENS)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t, _ in pairs]
    (args.workdir / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in pairs))
    with (args.workdir / "labelled.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "expert"])
        writer.writerows((text, DOMAINS[d]) for text, d in pairs)
    cli = str(Path(sys.executable).parent / "moemerge")
    page = args.workdir / "report.html"
    runs = {
        "texts": [cli, "report", str(out), "--file", str(args.workdir / "texts.jsonl"), "--device", "cpu"],
        "labelled": [cli, "report", str(out), "--dataset", str(args.workdir / "labelled.csv"), "--device", "cpu"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    sizes: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, command in runs.items():
            seconds[name].append(timed([*command, "-o", str(page)]))
            sizes[name] = page.stat().st_size
    rows = [
        {
            "run": name,
            "texts": len(pairs),
            "median_s": statistics.median(values),
            "seconds": values,
            "mb": sizes[name] / 1e6,
        }
        for name, values in seconds.items()
    ]
    invocation = "python benchmarks/report_speed.py " + shlex.join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"
    report = {"invocation": invocation, "date": date, "machine": machine, "tokens": [min(lengths), max(lengths)]}
    args.json.write_text(json.dumps({**report, "rows": rows}, indent=2) + "\n")
    lines = [
        f"`{invocation}` — {date}, {machine}; {len(pairs)} texts of {min(lengths)}–{max(lengths)} tokens",
        "",
        "| run | texts | median s (runs) | page MB | targets |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        runs_s = ", ".join(f"{s:.1f}" for s in row["seconds"])
        ok = "met" if row["median_s"] < LIMIT_S and row["mb"] < LIMIT_MB else "missed"
        lines.append(
            f"| {row['run']} | {row['texts']} | {row['median_s']:.1f} ({runs_s}) | {row['mb']:.2f} | "
            f"< {LIMIT_S} s, < {LIMIT_MB} MB: {ok} |"
        )
    args.markdown.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
