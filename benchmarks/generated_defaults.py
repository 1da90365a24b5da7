"""The `generate:` block's defaults, measured: how many continuations, how long, how hot, and whether the
prompt stays in front of its continuation, on the SmolLM2 demo of benchmarks/routing_quality.py.

For each seed k (prompt subset k, as routing_quality.py draws them, and generation seed k), each expert
continues its 5 prompts once per temperature, with the most continuations and tokens of the grid; a grid
point takes the first `continuations` of them and cuts each to its first `max_new_tokens` tokens (the same
text a shorter run with the same seed samples, up to re-tokenising the cut). The labelled texts are written
to a CSV and merged with today's `trained` gates (what `generated` then does), and the MoE is scored on the
held-out texts: token routing accuracy per domain and perplexity against the oracle.

    OMP_NUM_THREADS=1 nice python benchmarks/generated_defaults.py --json r.json --markdown r.md
    python benchmarks/generated_defaults.py --report-only --json r.json --markdown r.md   # the points done so far
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_quality import (  # noqa: E402
    ADAPTERS,
    DOMAINS,
    PROMPTS,
    ROOT,
    build_base,
    dense_perplexity,
    heldout,
    machine,
    recipe,
    run_moemerge,
    score_moe,
    short_prompts,
)

from moemerge.gates.expert_texts import labelled_texts, load_writer, write_expert_texts  # noqa: E402
from moemerge.gates.modes.generated import writing_dtype  # noqa: E402
from moemerge.gates.router_inputs import pad_ready  # noqa: E402
from moemerge.hf import load_tokenizer  # noqa: E402
from moemerge.inputs.experts import Expert  # noqa: E402
from moemerge.inputs.lora import LoraAdapter  # noqa: E402
from moemerge.inputs.recipe import ExpertSpec, GenerateSpec  # noqa: E402
from moemerge.inputs.sources import ModelSource  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One grid point."""

    continuations: int
    max_new_tokens: int
    temperature: float
    with_prompt: bool = True

    def name(self) -> str:
        prompt = "prompt+continuation" if self.with_prompt else "continuation only"
        return f"{self.continuations} × {self.max_new_tokens} tokens, T {self.temperature:g}, {prompt}"


GRID = [
    Point(4, 64, 0.9),  # the prototype
    Point(4, 64, 0.9, with_prompt=False),
    Point(2, 64, 0.9),
    Point(4, 32, 0.9),
    Point(6, 64, 0.9),
    Point(4, 96, 0.9),
    Point(4, 64, 0.6),
    Point(4, 64, 1.2),
]
TOP_P = 0.95


def generate(base: Path, seed: int, temperature: float, continuations: int, tokens: int, cache: Path) -> list[dict]:
    """Every expert's continuations of its prompts (subset `seed`), cached as JSONL."""
    if cache.is_file():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    source = ModelSource(base, "base_model")
    experts = [
        Expert(i, ExpertSpec(source_model=str(ADAPTERS / d)), source, LoraAdapter(ADAPTERS / d, d), 0)
        for i, d in enumerate(DOMAINS)
    ]
    prompts = [short_prompts(d, PROMPTS, seed=seed) for d in DOMAINS]
    spec = GenerateSpec(
        continuations=continuations, max_new_tokens=tokens, temperature=temperature, top_p=TOP_P, seed=seed
    )
    started = time.perf_counter()
    model = load_writer(base, torch.device("cpu"), writing_dtype(torch.device("cpu"), torch.float32))
    written = write_expert_texts(
        model, pad_ready(load_tokenizer(base)), experts, prompts, spec, lambda d, n: lambda k: None
    )
    seconds = time.perf_counter() - started
    rows = [{**asdict(row), "seconds": seconds} for row in written]
    cache.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def dataset(rows: list[dict], point: Point, tokenizer, path: Path) -> Path:
    """The grid point's labelled CSV: its first continuations, cut to its token count."""
    from moemerge.gates.expert_texts import Continuation

    chosen = []
    for row in rows:
        if row["sample"] >= point.continuations:
            continue
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][: point.max_new_tokens]
        fields = {k: v for k, v in row.items() if k != "seconds"}
        chosen.append(Continuation(**{**fields, "text": tokenizer.decode(ids)}))
    texts, labels = labelled_texts(chosen, list(DOMAINS), point.with_prompt)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "expert"])
        writer.writerows((text, DOMAINS[label]) for text, label in zip(texts, labels, strict=True))
    return path


def run_seed(seed: int, workdir: Path, points: list[Point]) -> list[dict]:
    """Every grid point for one seed; each result is also appended to workdir/results-<seed>.jsonl."""
    torch.manual_seed(0)
    base = build_base(ROOT / "examples" / ".cache" / "smollm2-base")
    tokenizer = load_tokenizer(base)
    texts = heldout(12)
    work = workdir / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    most = {
        t: tuple(
            max(getattr(p, key) for p in points if p.temperature == t) for key in ("continuations", "max_new_tokens")
        )
        for t in {p.temperature for p in points}
    }
    out = []
    for point in points:
        c, n = most[point.temperature]
        rows = generate(base, seed, point.temperature, c, n, work / f"texts-T{point.temperature:g}-{c}x{n}.jsonl")
        csv_path = dataset(rows, point, tokenizer, work / "train.csv")
        spec = recipe(base, "trained", seed, {"dataset_csv": str(csv_path)})
        merged, seconds = run_moemerge(work, "merged", spec, 0, {})
        result = {"point": asdict(point), "seed": seed, "merge_seconds": seconds, **score_moe(merged, texts)}
        result["generation_seconds"] = rows[0]["seconds"]
        out.append(result)
        with (workdir / f"results-{seed}.jsonl").open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    return out


def table(results: list[dict], oracle_mean: float) -> str:
    """One row per grid point, means over seeds; the last column's range is over seeds."""
    head = ["grid point", "seeds", *(f"acc {d}" for d in DOMAINS), "mean ppl", "vs oracle (min–max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point in GRID:
        runs = [r for r in results if r["point"] == asdict(point)]
        if not runs:
            continue
        acc = [sum(r["accuracy"][i] for r in runs) / len(runs) for i in range(len(DOMAINS))]
        means = [sum(r["perplexity"]) / len(DOMAINS) for r in runs]
        vs = [100 * (m / oracle_mean - 1) for m in means]
        spread = f" ({min(vs):+.1f}% – {max(vs):+.1f}%)" if len(vs) > 1 else ""
        cells = [point.name(), str(len(runs)), *(f"{a:.2f}" for a in acc), f"{sum(means) / len(means):.2f}"]
        lines.append("| " + " | ".join([*cells, f"{sum(vs) / len(vs):+.1f}%{spread}"]) + " |")
    return "\n".join(lines)


def report(summary: dict) -> str:
    """The markdown docs quote, from the summary the JSON holds."""
    oracle_mean = sum(summary["oracle"]) / len(summary["oracle"])
    head = f"`{summary['invocation']}` — {summary['date']}, {summary['machine']}; oracle mean perplexity "
    return head + f"{oracle_mean:.2f}\n\n" + table(summary["results"], oracle_mean) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-generated"))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true", help="tabulate the workdir's results so far")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = build_base(ROOT / "examples" / ".cache" / "smollm2-base")
    texts = heldout(12)
    by_domain = [[t for t, label in texts if label == i] for i in range(len(DOMAINS))]
    oracle = [dense_perplexity(base, ADAPTERS / d, by_domain[i]) for i, d in enumerate(DOMAINS)]
    if args.report_only:  # the points finished so far (each run appends its results as it goes)
        files = sorted(args.workdir.glob("results-*.jsonl"))
        results = [json.loads(line) for file in files for line in file.read_text().splitlines()]
    else:
        with ProcessPoolExecutor(len(seeds)) as pool:  # one process per seed: the seeds run side by side
            runs = pool.map(run_seed, seeds, [args.workdir] * len(seeds), [GRID] * len(seeds))
            results = [r for done in runs for r in done]
    invocation = "python benchmarks/generated_defaults.py " + " ".join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    summary = {"invocation": invocation, "date": date, "machine": machine(), "oracle": oracle, "results": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    markdown = report(summary)
    if args.markdown:
        args.markdown.write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
