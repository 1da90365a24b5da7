"""Non-expert weight policies × gate modes on a real model, against the oracle (each expert alone).

SmolLM2-135M and two sets of three domain LoRA experts (python code, licence texts, arithmetic; same training
splits, examples/train_experts.py): `mlp` adapts the MLPs only (examples/adapters), `attn` adapts q/k/v/o as
well (examples/adapters_attn: the `mlp` adapters trained on for 12 more steps with q/k/v/o added, see its
README), a stand-in for full fine-tunes whose attention a `base` policy throws away. For every set, policy
(`non_expert_weights`) and gate mode (hidden; trained; each optionally with `training.tune_on_moe`) the MoE is
merged and scored on held-out texts of each domain: perplexity and routing accuracy. The oracle is each expert
alone, dense (the base plus all its adapter's deltas), on its own domain. Merges are deterministic; the spread
is over held-out samples (`--runs`, a different sample of held-out texts each).

    python benchmarks/expert_policies.py                        # everything: hours on 2 busy shared cores
    python benchmarks/expert_policies.py --sets attn --gates trained,trained+tune
    python benchmarks/expert_policies.py --combos base/trained,average/trained+tune  # chosen pairs only

`tune_on_moe` costs about one forward pass of the whole MoE over the labelled prompts (two where every router is
replaced), so --train-prompts and --max-tokens bound it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from routing_quality import dense_perplexity, write_dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from build_base import build_base  # noqa: E402
from domains import DOMAINS, domain_texts, short_prompts  # noqa: E402

from moemerge import MergeOptions, merge  # noqa: E402
from moemerge.inputs.lora import LoraAdapter  # noqa: E402
from moemerge.tools.routing import load_moe, route  # noqa: E402

SETS = {"mlp": ROOT / "examples" / "adapters", "attn": ROOT / "examples" / "adapters_attn"}
POLICIES = ("base", "average")
GATES = ("hidden", "hidden+tune", "trained", "trained+tune")


def recipe(base: Path, adapters: Path, policy: str, gates: str, args: argparse.Namespace, dataset: Path) -> dict:
    """One merge: the set's experts with 5 short prompts each, the policy, and the gate mode."""
    mode, _, tune = gates.partition("+")
    spec: dict = {
        "base_model": str(base),
        "gate_mode": mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "non_expert_weights": policy,
        "experts": [
            {"name": d, "source_model": str(adapters / d), "positive_prompts": short_prompts(d, args.prompts)}
            for d in DOMAINS
        ],
        # Kept small so the gate pass stays under ~4 GiB on the shared machine (see the README).
        "training": {"max_tokens": args.max_tokens, "batch_size": 8, "tune_on_moe": bool(tune)},
    }
    if mode == "trained":
        spec["dataset_csv"] = str(dataset)
    return spec


def held_out(run: int, per_domain: int) -> list[tuple[str, int]]:
    """Held-out texts of every domain; each run draws another sample."""
    return [
        (text, i) for i, d in enumerate(DOMAINS) for text in domain_texts(d, "heldout", per_domain, chars=600, seed=run)
    ]


def combos(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (policy, gates) pairs to merge for every set: --combos, else every policy with every gate mode."""
    if args.combos:
        return [tuple(pair.split("/", 1)) for pair in args.combos.split(",")]
    return [(p, g) for p in args.policies.split(",") if p for g in args.gates.split(",") if g]


def adapts_shared_weights(adapters: Path) -> bool:
    """Whether any adapter of the set adapts a weight outside the MLPs: else `average` writes the base's shared
    tensors (the docs' rule, tested in test_non_expert.py), the same MoE as `base`, so it is not merged again."""
    return any(LoraAdapter(adapters / d, d).ignored for d in DOMAINS)


def score(out: Path, texts: list[tuple[str, int]]) -> dict:
    """Per domain: perplexity (token-weighted, the same ids as the oracle's) and top-1 routing accuracy (mean
    over layers and tokens), both from one forward pass per text."""
    model, tokenizer, _ = load_moe(out, torch.device("cpu"))
    nll, predicted, correct, tokens = ([0.0] * len(DOMAINS) for _ in range(4))
    for text, label in texts:
        routing = route(model, tokenizer, text)
        nll[label] += float(routing.token_losses.sum())
        predicted[label] += routing.predicted_tokens
        correct[label] += float(routing.top1_accuracy(label).mean()) * routing.logits.shape[1]
        tokens[label] += routing.logits.shape[1]
    return {
        "perplexity": [math.exp(n / p) for n, p in zip(nll, predicted, strict=True)],
        "accuracy": [c / t for c, t in zip(correct, tokens, strict=True)],
    }


def spread(values: list[list[float]]) -> tuple[list[float], list[float]]:
    """Per domain mean and standard deviation over runs (0 for one run)."""
    columns = list(zip(*values, strict=True))
    return [statistics.fmean(c) for c in columns], [statistics.pstdev(c) for c in columns]


def markdown(rows: list[dict], preamble: list[str]) -> str:
    """The table, after `preamble` (how it was measured), one paragraph per line."""
    lines = [
        *(line + "\n" for line in preamble),
        "| experts | policy | gates | " + " | ".join(f"ppl {d}" for d in DOMAINS) + " | mean ppl | vs oracle | "
        "routing acc | merge s |",
        "|" + "---|" * (len(DOMAINS) + 7),
    ]
    oracle_mean = {row["experts"]: row["mean"] for row in rows if row["gates"] == "oracle"}
    for row in rows:
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(row["perplexity"], row["perplexity_std"], strict=True)]
        accuracy = row.get("accuracy")
        lines.append(
            f"| {row['experts']} | {row['policy']} | {row['gates']} | "
            + " | ".join(cells)
            + f" | {row['mean']:.2f} | {100 * (row['mean'] / oracle_mean[row['experts']] - 1):+.1f}% | "
            + (f"{statistics.fmean(accuracy):.2f}" if accuracy else "—")
            + (f" | {row['seconds']:.0f} |" if "seconds" in row else " | — |")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-expert-policies"))
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--gates", default=",".join(GATES))
    parser.add_argument(
        "--combos", help="policy/gates pairs instead of policies × gates, e.g. base/hidden,average/trained+tune"
    )
    parser.add_argument("--prompts", type=int, default=5, help="short prompts per expert (hidden gates)")
    parser.add_argument("--train-prompts", type=int, default=30, help="labelled prompts per expert (trained)")
    parser.add_argument("--max-tokens", type=int, default=128, help="training.max_tokens")
    parser.add_argument("--heldout", type=int, default=8, help="held-out texts per domain and run")
    parser.add_argument("--runs", type=int, default=2, help="held-out samples")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "expert_policies.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results" / "expert_policies.md")
    args = parser.parse_args()
    command = "python benchmarks/expert_policies.py " + shlex.join(sys.argv[1:])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    base = build_base(ROOT / "examples" / ".cache" / "smollm2-base")
    dataset = write_dataset(args.workdir / "train.csv", args.train_prompts)
    samples = [held_out(run, args.heldout) for run in range(args.runs)]
    by_domain = [[[t for t, label in texts if label == i] for i in range(len(DOMAINS))] for texts in samples]
    rows: list[dict] = []
    notes: list[str] = []
    start_load = os.getloadavg()[0]

    def add(row: dict, per_run: list[list[float]]) -> None:
        """Record a row and rewrite both result files, so an interrupted run keeps what it measured."""
        row["perplexity"], row["perplexity_std"] = spread(per_run)
        row["mean"] = statistics.fmean(row["perplexity"])
        rows.append(row)
        load = f"{start_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the last row"
        summary = {"command": command, "date": date, "load_1min": load, "domains": DOMAINS, "runs": args.runs}
        summary |= {"heldout_per_domain": args.heldout, "notes": notes, "rows": rows}
        preamble = [
            f"`{command}` ({date}; {args.runs} run(s) × {args.heldout} held-out texts per domain; ± is the "
            f"standard deviation over runs; 2 CPU cores shared with other jobs, 1-minute load {load})",
            *notes,
        ]
        table = markdown(rows, preamble)
        args.json.write_text(json.dumps(summary, indent=2))
        args.markdown.write_text(table)
        print(table.splitlines()[-1], flush=True)

    names = [s for s in args.sets.split(",") if s]
    for name in names:  # oracles first, then each pair for every set: an interrupted run has comparable rows
        oracle = [
            [dense_perplexity(base, SETS[name] / d, texts[i]) for i, d in enumerate(DOMAINS)] for texts in by_domain
        ]
        add({"experts": name, "policy": "—", "gates": "oracle"}, oracle)
        if not adapts_shared_weights(SETS[name]):
            notes.append(
                f"`{name}` has no `average` rows: its adapters adapt only MLP weights, so `average` writes the "
                "base's shared tensors, the same MoE as `base`."
            )
    for policy, gates in combos(args):
        for name in names:
            if policy != "base" and not adapts_shared_weights(SETS[name]):
                continue
            spec = recipe(base, SETS[name], policy, gates, args, dataset)
            label = f"{name}-{policy}-{gates.replace('+', '-')}"
            (args.workdir / f"{label}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            started = time.perf_counter()
            merge(args.workdir / f"{label}.yaml", args.workdir / label, MergeOptions(force=True, device="cpu"))
            seconds = time.perf_counter() - started
            scores = [score(args.workdir / label, texts) for texts in samples]
            accuracy = [statistics.fmean(a) for a in zip(*(s["accuracy"] for s in scores), strict=True)]
            row = {"experts": name, "policy": policy, "gates": gates, "seconds": seconds, "accuracy": accuracy}
            add(row, [s["perplexity"] for s in scores])
            shutil.rmtree(args.workdir / label)
    print(args.markdown.read_text())


if __name__ == "__main__":
    main()
