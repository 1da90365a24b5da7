"""Request routing on a real model: SmolLM2-135M + the three shipped domain LoRA experts, hidden and trained gates.

On the routing benchmark's held-out texts (benchmarks/routing_quality.py), per domain:
- request accuracy: the share of texts whose request decision (top-1) is their domain, decided on the whole text
  and on its first `--decide-tokens` tokens, for several decision rules (which layers, probabilities or logits);
- perplexity on each text's tokens after the first `--decide-tokens`: token routing (top-2, as built), request
  routing (decided from those first tokens: top-1, top-2 with the router's choice, top-2 with fixed weights), and
  the oracle (the text's own expert alone, forced: exactly the dense expert, see tests/tools/test_request_routing.py);
- generation speed on the demo model (examples/demo_recipe.yaml) through the engine `moemerge serve` runs
  (moemerge.tools.engine.Engine, greedy): token routing top-2 against request routing top-1, alternating in one run.

    python benchmarks/request_routing.py                        # writes benchmarks/results/request_routing.{json,md}
    python benchmarks/request_routing.py --parts speed          # one part; the report is written once all are in
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from build_base import build_base  # noqa: E402
from demo import QUESTIONS  # noqa: E402
from domains import DOMAINS  # noqa: E402
from routing_quality import heldout, recipe, write_dataset  # noqa: E402

from moemerge import MergeOptions, merge  # noqa: E402
from moemerge.tools.engine import Delta, Engine  # noqa: E402
from moemerge.tools.evaluate import evaluate  # noqa: E402
from moemerge.tools.request_routing import Decision, RequestRouting, request_scores, restricted  # noqa: E402
from moemerge.tools.routing import load_moe, next_token_losses, route, tokenize  # noqa: E402

# Request-decision rules compared: a name and the [experts] scores it takes from [layers, tokens, experts] logits.
RULES = {
    "mean probability, all layers (default)": request_scores,
    "mean probability, first third of layers": lambda x: request_scores(x[: len(x) // 3]),
    "mean probability, middle third": lambda x: request_scores(x[len(x) // 3 : 2 * len(x) // 3]),
    "mean probability, last third": lambda x: request_scores(x[2 * len(x) // 3 :]),
    "mean logit, all layers": lambda x: x.mean(dim=(0, 1)),
    "top-1 votes, all layers": lambda x: torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float().mean((0, 1)),
}
REQUEST_RUNS = [(1, "router"), (2, "router"), (2, "fixed")]


def rule_accuracy(model, tokenizer, texts: list[tuple[str, int]], decide_tokens: int) -> dict:
    """Per rule, per domain: share of texts whose top-scored expert is their domain (whole text; first tokens)."""
    right = {rule: {"whole": [0] * len(DOMAINS), "first": [0] * len(DOMAINS)} for rule in RULES}
    counts = [0] * len(DOMAINS)
    for text, label in texts:
        routing = route(model, tokenizer, text)
        first = routing.logits[:, : int(routing.real[:decide_tokens].sum())]
        counts[label] += 1
        for rule, score in RULES.items():
            right[rule]["whole"][label] += int(score(routing.logits).argmax()) == label
            right[rule]["first"][label] += int(score(first).argmax()) == label

    def share(hits: list[int]) -> list[float]:
        return [h / n for h, n in zip(hits, counts, strict=True)]

    return {rule: {where: share(hits) for where, hits in by.items()} for rule, by in right.items()}


def oracle_perplexity(model, tokenizer, texts: list[tuple[str, int]], decide_tokens: int) -> list[float]:
    """Each text's own expert alone, on the tokens after the first `decide_tokens` (as evaluate scores them)."""
    nll, count = [0.0] * len(DOMAINS), [0] * len(DOMAINS)
    for text, label in texts:
        ids, _ = tokenize(tokenizer, text)
        with restricted(model, Decision.forced([label])):
            losses, _ = next_token_losses(model, ids)
        nll[label] += float(losses[decide_tokens - 1 :].sum())
        count[label] += len(losses) - decide_tokens + 1
    return [float(torch.tensor(n / c).exp()) for n, c in zip(nll, count, strict=True)]


def quality(out: Path, texts: list[tuple[str, int]], decide_tokens: int) -> dict:
    model, tokenizer, names = load_moe(out, torch.device("cpu"))
    assert tuple(names) == DOMAINS, names
    runs = {}
    for top_k, mixing in REQUEST_RUNS:
        result = evaluate(model, tokenizer, names, texts, True, top_k, decide_tokens, mixing)
        runs[f"request top-{top_k}, {mixing}"] = result.request_perplexity
    return {
        "token_accuracy": result.accuracy,
        "request_accuracy": result.request_accuracy,
        "rules": rule_accuracy(model, tokenizer, texts, decide_tokens),
        "perplexity": {
            "oracle": oracle_perplexity(model, tokenizer, texts, decide_tokens),
            "token top-2": result.scored_token_perplexity,
            **runs,
        },
    }


def generation_speed(out: Path, rounds: int, max_tokens: int) -> dict:
    """Tokens per second (prompt pass, decision and decoding included) per round, the two modes alternating."""
    model, tokenizer, names = load_moe(out, torch.device("cpu"))
    engines = {"token top-2": Engine(model, tokenizer, names)}
    engines["request top-1"] = Engine(model, tokenizer, names, RequestRouting("request", 1))
    params = engines["token top-2"].params(temperature=0, max_tokens=max_tokens)
    questions = list(QUESTIONS.values())
    rates: dict[str, list[float]] = {mode: [] for mode in engines}
    decode_rates: dict[str, list[float]] = {mode: [] for mode in engines}
    tokens: dict[str, list[int]] = {mode: [] for mode in engines}
    for number in range(rounds + 1):  # round 0 warms up and is not counted
        order = list(engines) if number % 2 else list(reversed(engines))
        for mode in order:
            engine, generated, decoded, decoding, started = engines[mode], 0, 0, 0.0, time.perf_counter()
            for question in questions:
                ids = engine.chat_ids([{"role": "user", "content": question}])
                first = None  # when the first token arrived: prompt pass and decision are done
                for event in engine.generate(ids, params):
                    first = first or time.perf_counter()
                    if not isinstance(event, Delta):
                        generated += event.completion_tokens
                        decoded += event.completion_tokens - 1
                decoding += time.perf_counter() - first
            if number:
                rates[mode].append(generated / (time.perf_counter() - started))
                decode_rates[mode].append(decoded / decoding)
                tokens[mode].append(generated)
    ratios = [r / t for r, t in zip(rates["request top-1"], rates["token top-2"], strict=True)]
    decode_ratios = [r / t for r, t in zip(decode_rates["request top-1"], decode_rates["token top-2"], strict=True)]
    return {
        "tokens_per_second": rates,
        "decode_tokens_per_second": decode_rates,
        "completion_tokens": tokens,
        "ratio": ratios,
        "decode_ratio": decode_ratios,
        "threads": torch.get_num_threads(),
    }


def _spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def markdown(results: dict) -> str:
    """The tables the README shows."""
    lines = [
        "Commands: " + "; ".join(f"`{c}`" for c in results["commands"]) + "  ",
        f"Date: {results['date']}; CPU, a shared 2-core machine. Peak RSS per part (GiB): "
        + ", ".join(f"{part} {gib:.1f}" for part, gib in results["peak_rss_gib"].items())
        + ". Request perplexity is decided from each text's first tokens (BOS included), every perplexity is "
        "scored on the tokens after them. Quality figures are deterministic (one run); speed: median (min–max) "
        "over rounds. Missing parts: " + (", ".join(results["missing"]) or "none") + ".",
        "",
    ]
    for gates, q in results["gates"].items():
        settings = results["settings"][gates]
        lines += [
            f"**{gates} gates** ({settings['heldout']} held-out texts per domain, decided from the first "
            f"{settings['decide_tokens']} tokens"
            + (
                f"; {settings['train_prompts']} labelled prompts per expert, training.max_tokens "
                f"{settings['train_max_tokens']}"
                if gates == "trained"
                else ""
            )
            + ") — perplexity per domain (mean vs oracle), request accuracy (top-1, whole text)",
            "",
        ]
        head = ["routing", *DOMAINS, "mean", "vs oracle"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        oracle = sum(q["perplexity"]["oracle"]) / len(DOMAINS)
        for name, values in q["perplexity"].items():
            mean = sum(values) / len(values)
            cells = [name, *(f"{v:.3f}" for v in values), f"{mean:.3f}", f"{100 * (mean / oracle - 1):+.2f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        for name in ("request_accuracy", "token_accuracy"):
            cells = " | ".join(f"{a:.2f}" for a in q[name])
            lines.append(f"| {name.replace('_', ' ')} | {cells} | | |")
        lines += ["", f"Decision rules, {gates} gates: request accuracy per domain, whole text / first tokens", ""]
        lines += ["| rule | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
        for rule, acc in q["rules"].items():
            cells = [f"{w:.2f} / {f:.2f}" for w, f in zip(acc["whole"], acc["first"], strict=True)]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    speed = results.get("speed")
    if speed is None:
        return "\n".join(lines) + "\n"
    settings = results["settings"]["speed"]
    lines += [
        f"**Generation speed** (demo model, `Engine` of `moemerge serve` in-process, greedy, the 3 demo chat "
        f"questions per round, up to {settings['max_tokens']} tokens each, {speed['threads']} torch thread, "
        f"{settings['rounds']} rounds alternating the order; end to end: tokens/s including the prompt pass and "
        "the decision; decoding: tokens after the first one, per second after the first one arrived)",
        "",
    ]
    lines += ["| routing | tokens/s end to end | tokens/s decoding | completion tokens |", "|---|---|---|---|"]
    for mode, rates in speed["tokens_per_second"].items():
        decoding = _spread(speed["decode_tokens_per_second"][mode])
        lines.append(f"| {mode} | {_spread(rates)} | {decoding} | {_spread(speed['completion_tokens'][mode], 0)} |")
    lines.append(f"| request / token | {_spread(speed['ratio'])}× | {_spread(speed['decode_ratio'])}× | |")
    return "\n".join(lines) + "\n"


def run_part(part: str, args: argparse.Namespace) -> dict:
    """One part of the benchmark: the quality of one gate mode, or the generation speed."""
    started = time.perf_counter()
    if part == "speed":
        merge(ROOT / "examples" / "demo_recipe.yaml", args.workdir / "demo", MergeOptions(force=True, device="cpu"))
        result = generation_speed(args.workdir / "demo", args.rounds, args.max_tokens)
    else:
        base = build_base(ROOT / "examples" / ".cache" / "smollm2-base")
        extra = {}
        if part == "trained":
            dataset = write_dataset(args.workdir / "train.csv", args.train_prompts)
            extra = {"dataset_csv": str(dataset), "training": {"max_tokens": args.train_max_tokens}}
        (args.workdir / f"{part}.yaml").write_text(yaml.safe_dump(recipe(base, part, args.prompts, extra)))
        merge(args.workdir / f"{part}.yaml", args.workdir / part, MergeOptions(force=True, device="cpu"))
        result = quality(args.workdir / part, heldout(args.heldout), args.decide_tokens)
    return {
        "command": shlex.join(["python", "benchmarks/request_routing.py", *sys.argv[1:]]),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("parts", "workdir", "out")},
        "result": result,
    }


PARTS = ("hidden", "trained", "speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-request-routing"))
    parser.add_argument("--parts", default=",".join(PARTS), help="run these now (parts may run in parallel)")
    parser.add_argument("--report", action="store_true", help="only write the report from the parts in --workdir")
    parser.add_argument("--heldout", type=int, default=12, help="held-out texts per domain")
    parser.add_argument("--prompts", type=int, default=5, help="prompts per expert for hidden gates")
    parser.add_argument("--train-prompts", type=int, default=20, help="labelled prompts per expert (trained)")
    parser.add_argument("--train-max-tokens", type=int, default=128, help="training.max_tokens for trained gates")
    parser.add_argument("--decide-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds per mode")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest answer in the speed runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "request_routing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for part in [p for p in args.parts.split(",") if p and not args.report]:
        if part not in PARTS:
            parser.error(f"--parts: unknown part {part!r}; use {', '.join(PARTS)}")
        (args.workdir / f"part-{part}.json").write_text(json.dumps(run_part(part, args), indent=2) + "\n")
    files = {part: args.workdir / f"part-{part}.json" for part in PARTS}
    parts = {part: json.loads(f.read_text()) for part, f in files.items() if f.is_file()}
    if not parts:
        return
    results = {
        "commands": sorted({p["command"] for p in parts.values()}),
        "date": max(p["finished"] for p in parts.values()),
        "domains": DOMAINS,
        "missing": [part for part in PARTS if part not in parts],
        "settings": {part: p["settings"] for part, p in parts.items()},
        "gates": {gates: parts[gates]["result"] for gates in ("hidden", "trained") if gates in parts},
        "speed": parts["speed"]["result"] if "speed" in parts else None,
        "peak_rss_gib": {part: p["peak_rss_gib"] for part, p in parts.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
