"""The `generate:` block's defaults and generated gates' own constants, measured: how many continuations, how
many unprompted texts, how hot, how sharp the fitted routers are, and how long the fit runs, on the SmolLM2
demo of benchmarks/routing_quality.py.

For each seed k (prompt subset k, as routing_quality.py draws them, and generation seed k), each grid point
is a whole `gate_mode: generated` merge (its `generate:` keys and its fit's `training: {steps, lr}` in the
recipe, the module constants generated.WITH_PROMPT, generated.SHARPNESS and trained.SET_SHARE patched for the
merge), scored on the held-out texts as routing_quality.py scores every method: token routing accuracy per
domain and perplexity against the oracle.

    OMP_NUM_THREADS=1 nice python benchmarks/generated_defaults.py --json r.json --markdown r.md
    python benchmarks/generated_defaults.py --points 1,2 --seeds 0    # some points (1-based, table order)
    python benchmarks/generated_defaults.py --report-only --json r.json --markdown r.md   # the points done so far
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_quality import (  # noqa: E402
    ADAPTERS,
    DOMAINS,
    ROOT,
    build_base,
    dense_perplexity,
    heldout,
    machine,
    recipe,
    run_moemerge,
    score_moe,
)

from moemerge.gates import trained  # noqa: E402
from moemerge.gates.modes import generated  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One grid point."""

    continuations: int
    max_new_tokens: int
    temperature: float
    unprompted: int = 0
    sharpness: float = 1.0
    with_prompt: bool = True
    steps: int = 60  # the fit: training.steps and training.lr (generated.FIT_DEFAULTS), and trained.SET_SHARE
    lr: float = 0.05
    set_share: int = 4  # a step draws 1/set_share of the set's tokens (1: as many as trained.TOKENS_PER_STEP)

    def name(self) -> str:
        prompt = "prompt+continuation" if self.with_prompt else "continuation only"
        return (
            f"{self.continuations} × {self.max_new_tokens} tokens, {self.unprompted} unprompted, "
            f"T {self.temperature:g}, sharpness {self.sharpness:g}, {prompt}; "
            f"fit {self.steps} steps of 1/{self.set_share} of the set, lr {self.lr:g}"
        )


# Before the fit's own defaults were measured, every point fitted as trained gates do by default: 300 steps
# at lr 0.01, each drawing up to 4096 tokens (set_share 1 here).
OLD_FIT = {"steps": 300, "lr": 0.01, "set_share": 1}
GRID = [
    Point(4, 64, 0.9, **OLD_FIT),  # the prototype
    Point(4, 64, 0.9, unprompted=8, **OLD_FIT),
    Point(4, 64, 0.9, sharpness=2.0, **OLD_FIT),
    Point(4, 64, 0.9, unprompted=8, sharpness=2.0, **OLD_FIT),
    Point(4, 64, 0.9, unprompted=8, sharpness=3.0, **OLD_FIT),
    Point(4, 64, 0.9, unprompted=16, sharpness=2.0, **OLD_FIT),
    Point(4, 64, 0.7, unprompted=8, sharpness=2.0, **OLD_FIT),
    Point(2, 64, 0.9, unprompted=8, sharpness=2.0, **OLD_FIT),
    Point(4, 32, 0.9, unprompted=8, sharpness=2.0, **OLD_FIT),
    Point(4, 64, 0.9, unprompted=8, sharpness=2.0, with_prompt=False, **OLD_FIT),
    Point(4, 64, 0.5, unprompted=8, sharpness=2.0, **OLD_FIT),
    Point(4, 64, 0.7, unprompted=8, sharpness=2.0, steps=300, lr=0.01),
    Point(4, 64, 0.7, unprompted=8, sharpness=2.0, steps=100, lr=0.01),
    Point(4, 64, 0.7, unprompted=8, sharpness=2.0, steps=100, lr=0.03),
    Point(4, 64, 0.7, unprompted=8, sharpness=2.0),  # the defaults
    Point(4, 64, 0.7, unprompted=16, sharpness=2.0),
    Point(4, 64, 0.7, unprompted=8, sharpness=3.0),
]
TOP_P = 0.95


def run_seed(seed: int, workdir: Path, points: list[Point]) -> list[dict]:
    """Every grid point for one seed; each result is also appended to workdir/results-<seed>.jsonl."""
    torch.manual_seed(0)
    base = build_base(ROOT / "examples" / ".cache" / "smollm2-base")
    texts = heldout(12)
    work = workdir / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for point in points:
        keys = {"continuations", "max_new_tokens", "temperature", "unprompted"}
        generate = {**{k: v for k, v in asdict(point).items() if k in keys}, "top_p": TOP_P, "seed": seed}
        fit = {"steps": point.steps, "lr": point.lr}
        spec = recipe(base, "generated", seed, {"generate": generate, "training": fit})
        patches = {
            (generated, "SHARPNESS"): point.sharpness,
            (generated, "WITH_PROMPT"): point.with_prompt,
            (trained, "SET_SHARE"): point.set_share,
        }
        merged, seconds = run_moemerge(work, "merged", spec, seed, patches)
        result = {"point": asdict(point), "seed": seed, "merge_seconds": seconds, **score_moe(merged, texts)}
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
    parser.add_argument("--points", default=None, help="grid points to run, 1-based in table order (default all)")
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
            points = [GRID[int(i) - 1] for i in args.points.split(",")] if args.points else GRID
            runs = pool.map(run_seed, seeds, [args.workdir] * len(seeds), [points] * len(seeds))
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
