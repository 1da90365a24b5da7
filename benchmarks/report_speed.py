"""How long `moemerge report` takes and how large its page is, for 200 texts of 256 tokens on the demo model
(SmolLM2-135M + the three shipped LoRA experts, examples/demo_recipe.yaml), on CPU; and how often routing in
bfloat16 (what `report` does by default on a CPU that computes bfloat16 natively) picks float32's experts.

- the whole command, as a user runs it (start, loading the model, routing every text, the page, writing it):
  `moemerge report OUT --file texts.jsonl` and `moemerge report OUT --dataset labelled.csv`, in a child process
  with its default torch threads and dtype;
- routing only (`routing.route_texts`, what report, route and eval run), in this process, in bfloat16 and in
  float32, and how often the two agree: the top-1 expert per (layer, token), the top-k set per (layer, token),
  and each text's request-level decision.

Wall time depends on what else the machine runs; CPU time (user + system, every thread) much less, so both are
given, with the load average. Texts: the shipped domain texts (examples/texts/, examples/domains.py), each cut
to its first 256 tokens, the domains in turn.

    python benchmarks/report_speed.py       # writes benchmarks/results/report_speed.json, docs/results/report_speed.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from domains import DOMAINS, domain_texts  # noqa: E402

from moemerge import MergeOptions, merge  # noqa: E402
from moemerge.device import cpu_has_native_bf16  # noqa: E402
from moemerge.tools.request_routing import decide  # noqa: E402
from moemerge.tools.routing import Routing, load_moe, route_texts, routing_dtype  # noqa: E402

TEXTS = 200
TOKENS = 256
LIMIT_S, LIMIT_MB = 60, 10  # the targets: under a minute, under 10 MB
CPU = torch.device("cpu")


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
    """What `work` returns, its wall seconds and its CPU seconds (this process and its children, every thread)."""

    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    started, wall = cpu(), time.perf_counter()
    result = work()
    return result, time.perf_counter() - wall, cpu() - started


def run_report(out: Path, source: list[str], page: Path, repeat: int) -> dict:
    """`moemerge report` as a user runs it, timed whole, `repeat` times: the median run's times and the range."""
    command = [str(Path(sys.executable).with_name("moemerge")), "report", str(out), *source, "-o", str(page)]
    runs = []
    for _ in range(repeat):
        run, wall, cpu = timed(lambda: subprocess.run(command, capture_output=True, text=True))
        if run.returncode != 0:
            raise SystemExit(f"error: {shlex.join(command)} failed: {run.stderr.strip()}")
        runs.append((wall, cpu))
    walls = sorted(wall for wall, _ in runs)
    wall, cpu = sorted(runs)[len(runs) // 2]
    dtype = str(routing_dtype("auto", CPU)).removeprefix("torch.")
    return {
        "wall_s": wall,
        "wall_range_s": [walls[0], walls[-1]],
        "runs": repeat,
        "cpu_s": cpu,
        "mb": page.stat().st_size / 1e6,
        "dtype": dtype,
    }


def route_only(out: Path, texts: list[str], dtype: torch.dtype) -> tuple[list[Routing], dict]:
    """The texts' routings in `dtype`, and the time they took (the model loaded beforehand)."""
    model, tokenizer, _ = load_moe(out, CPU, dtype)
    routings, wall, cpu = timed(lambda: list(route_texts(model, tokenizer, texts)))
    name = str(dtype).removeprefix("torch.")
    return routings, {"part": f"routing only, {name}", "wall_s": wall, "cpu_s": cpu, "mb": None, "dtype": name}


def agreement(bf16: list[Routing], fp32: list[Routing]) -> dict:
    """How often bfloat16 routing makes float32's choices: top-1 expert and top-k set per (layer, token), and the
    request-level decision (top-1) per text."""
    top1 = topk = pairs = requests = 0
    for low, high in zip(bf16, fp32, strict=True):
        top1 += int((low.logits.argmax(dim=-1) == high.logits.argmax(dim=-1)).sum())
        topk += int((low.choices.sort(dim=-1).values == high.choices.sort(dim=-1).values).all(dim=-1).sum())
        pairs += low.logits.shape[0] * low.logits.shape[1]
        requests += decide(low.logits, 1).experts == decide(high.logits, 1).experts
    return {"pairs": pairs, "top1": top1 / pairs, "topk": topk / pairs, "requests": requests / len(fp32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-report"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "report_speed.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "results" / "report_speed.md")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each whole command (median and range)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    if not cpu_has_native_bf16():
        raise SystemExit("error: this CPU does not compute bfloat16 natively; report routes in float32 here")
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.workdir / "demo-moe"
    if not (out / "moemerge.json").is_file():
        merge(ROOT / "examples" / "demo_recipe.yaml", out, MergeOptions(device="cpu", force=True))
    _, tokenizer, names = load_moe(out, CPU)
    labelled = texts_of_tokens(tokenizer, TEXTS, TOKENS)
    texts = [text for text, _ in labelled]
    text_file, dataset = args.workdir / "texts.jsonl", args.workdir / "labelled.csv"
    text_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    with dataset.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("prompt", "expert"), *((t, names[d]) for t, d in labelled)])
    page = args.workdir / "report.html"
    rows = [
        {"part": f"moemerge report --file ({TEXTS} texts), whole command"}
        | run_report(out, ["--file", str(text_file)], page, args.repeat),
        {"part": f"moemerge report --dataset ({TEXTS} labelled texts), whole command"}
        | run_report(out, ["--dataset", str(dataset)], page, args.repeat),
    ]
    routed = {}
    for dtype in (torch.bfloat16, torch.float32):
        routed[dtype], row = route_only(out, texts, dtype)
        rows.append(row)
    tokens = sum(int(r.real.sum()) for r in routed[torch.float32]) / TEXTS
    invocation = "python benchmarks/report_speed.py " + shlex.join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads, 1-minute load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    data = {
        "invocation": invocation,
        "date": date,
        "machine": machine,
        "texts": TEXTS,
        "tokens_per_text": tokens,
        "top_k": routed[torch.float32][0].top_k,
        "rows": rows,
        "agreement": agreement(routed[torch.bfloat16], routed[torch.float32]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2) + "\n")
    args.markdown.write_text(markdown(data))
    print(markdown(data))


def markdown(data: dict) -> str:
    """The table the docs quote, from the JSON this script writes."""
    lines = [
        f"`{data['invocation']}` — {data['date']}, {data['machine']}; {data['texts']} texts of "
        f"{data['tokens_per_text']:.0f} tokens on average, demo model",
        "",
        "| part | routing dtype | wall s | CPU s | page MB |",
        "|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        size = "—" if row["mb"] is None else f"{row['mb']:.2f}"
        wall = f"{row['wall_s']:.1f}"
        if "runs" in row:
            low, high = row["wall_range_s"]
            wall += f" (median of {row['runs']}: {low:.1f}–{high:.1f})"
        lines.append(f"| {row['part']} | {row['dtype']} | {wall} | {row['cpu_s']:.1f} | {size} |")
    same = data["agreement"]
    lines += [
        "",
        f"bfloat16 routing against float32, over {same['pairs']:,} (layer, token) pairs: the top-1 expert agrees "
        f"on {same['top1']:.2%}, the top-{data['top_k']} set on {same['topk']:.2%}; the request-level decision "
        f"(top-1) of {same['requests']:.1%} of the texts.",
        "",
        f"(targets for the whole report: under {LIMIT_S} s, under {LIMIT_MB} MB)",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
