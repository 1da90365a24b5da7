"""Routing quality on a real model: SmolLM2-135M + three domain LoRA experts, every gate mode side by side.

For each method the MoE is merged from the same recipe, then scored on held-out text of each domain (shipped
texts from files never used for training or prompts): routing accuracy (top-1 router choice equals the
text's domain, all layers, all tokens) and perplexity. The oracle is each expert alone (base + its adapter,
dense) on its own domain. Methods whose result depends on a choice are run several times: prompt-based gates
over prompt subsets (subset k = `short_prompts(domain, 5, seed=k)`), random gates over merge seeds; trained
gates once (they need ~9 GB and minutes). Writes the JSON of every run and the markdown table of the docs.

    python benchmarks/routing_quality.py --json routing.json --markdown routing.md
    python benchmarks/routing_quality.py --methods hidden --gate-scales 1,3,10,30,100 --runs 5
    python benchmarks/routing_quality.py --plot-only --json docs/results/routing_quality.json \
        --figure docs/figures/routing_quality.png     # the figure from an earlier run's JSON, nothing run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from build_base import build_base  # noqa: E402
from domains import DOMAINS, domain_texts, short_prompts  # noqa: E402

from moemerge import MergeOptions, merge, plots  # noqa: E402
from moemerge.gates import hidden as hidden_gates  # noqa: E402
from moemerge.inputs.gate_modes import GATE_MODE_SPECS, Needs  # noqa: E402
from moemerge.inputs.lora import LoraAdapter  # noqa: E402
from moemerge.inputs.recipe import Recipe  # noqa: E402
from moemerge.tools.evaluate import evaluate  # noqa: E402
from moemerge.tools.routing import load_moe  # noqa: E402

ADAPTERS = ROOT / "examples" / "adapters"
PROMPTS = 5  # short prompts per expert for prompt-based gates
DEFAULT_SCALE = Recipe.model_fields["gate_scale"].default


def recipe(base: Path, gate_mode: str, subset: int, extra: dict, dense: dict[str, Path] | None = None) -> dict:
    """The same experts and prompts for every method (prompt subset ``subset``); mergekit gets full expert
    folders (its `base+adapter` form fails in mergekit-moe 0.1.5 with "LoRA not merged")."""
    experts = []
    for domain in DOMAINS:
        source = str(dense[domain]) if dense else str(ADAPTERS / domain)
        entry = {"source_model": source, "positive_prompts": short_prompts(domain, PROMPTS, seed=subset)}
        if not dense:
            entry["name"] = domain
        experts.append(entry)
    return {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": experts,
        **extra,
    }


def write_dataset(path: Path, per_expert: int) -> Path:
    """Labelled training prompts for trained gates: chunks from the train split, never from held-out files."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "expert"])
        for domain in DOMAINS:
            for text in domain_texts(domain, "train", per_expert, chars=400, seed=1):
                writer.writerow([text, domain])
    return path


def heldout(per_domain: int) -> list[tuple[str, int]]:
    return [(t, i) for i, d in enumerate(DOMAINS) for t in domain_texts(d, "heldout", per_domain, chars=600)]


def score_moe(out: Path, texts: list[tuple[str, int]]) -> dict:
    model, tokenizer, _ = load_moe(out, torch.device("cpu"))
    result = evaluate(model, tokenizer, list(DOMAINS), texts, with_perplexity=True)
    return {"accuracy": result.accuracy, "perplexity": result.perplexity}


def dense_expert(base: Path, adapter: Path | None):
    """The base with an adapter's delta added to its weights: the expert as a plain dense model."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter is not None:
        lora = LoraAdapter(adapter, str(adapter))
        with torch.no_grad():
            for name, param in model.named_parameters():
                delta = lora.delta(name, tuple(param.shape))
                if delta is not None:
                    param += delta
    return model


def dense_folders(base: Path, work: Path) -> dict[str, Path]:
    """Each expert saved as a full model folder, for tools that need one."""
    folders = {}
    for domain in DOMAINS:
        folder = work / f"dense-{domain}"
        if not (folder / "config.json").exists():
            dense_expert(base, ADAPTERS / domain).save_pretrained(folder)
            AutoTokenizer.from_pretrained(base).save_pretrained(folder)
        folders[domain] = folder
    return folders


def dense_perplexity(base: Path, adapter: Path | None, texts: list[str]) -> float:
    """Perplexity of base (+ adapter merged by hand) on texts, token-weighted."""
    model = dense_expert(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    nll = count = 0.0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            loss = model(ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def run_moemerge(work: Path, name: str, spec: dict, seed: int, patches: dict) -> tuple[Path, float]:
    """Merge in this process (``patches``: module constants to override for an ablation) and time it."""
    (work / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    with ExitStack() as stack:
        for (module, constant), value in patches.items():
            stack.enter_context(mock.patch.object(module, constant, value))
        merge(work / f"{name}.yaml", work / name, MergeOptions(force=True, device="cpu", seed=seed))
    return work / name, time.perf_counter() - started


def run_mergekit(work: Path, exe: str, spec: dict) -> tuple[Path, float]:
    """mergekit-moe in its own venv, on the same recipe."""
    (work / "mergekit.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.rmtree(work / "mergekit", ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([exe, str(work / "mergekit.yaml"), str(work / "mergekit"), "--device", "cpu", "--quiet"], check=True)
    return work / "mergekit", time.perf_counter() - started


@dataclass
class Method:
    """One table row: how to merge it, and over what its runs vary."""

    name: str
    gate_mode: str | None  # None: mergekit-moe's hidden gates
    extra: dict = field(default_factory=dict)
    varies: str = "prompts"  # "prompts" (subset k), "seed" (merge seed k) or "once"
    patches: dict = field(default_factory=dict)


def methods(chosen: list[str], gate_scales: list[float], dataset: Path) -> list[Method]:
    """The rows asked for, in table order: one per gate mode in moemerge's registry, run over what its result
    depends on (a mode that needs nothing: merge seeds; prompts: prompt subsets; a dataset: once, on the
    benchmark's labelled set), hidden gates at each scale, and two baselines."""
    varies = {Needs.NOTHING: "seed", Needs.PROMPTS: "prompts", Needs.DATASET: "once"}
    rows = {
        name: [
            Method(
                name,
                name,
                {"dataset_csv": str(dataset)} if spec.needs is Needs.DATASET else {},
                varies=varies[spec.needs],
            )
        ]
        for name, spec in GATE_MODE_SPECS.items()
    }
    rows["hidden"] = [
        Method(
            f"moemerge `hidden`, gate_scale {scale:g}{' (default)' * (scale == DEFAULT_SCALE)}",
            "hidden",
            {"gate_scale": scale},
        )
        for scale in gate_scales
    ]
    rows["class_mean"] = [
        Method(
            "moemerge `hidden`, class means (no discriminant)",
            "hidden",
            patches={(hidden_gates, "SHRINKAGE"): 1.0},  # Σ shrunk all the way to the identity
        )
    ]
    rows["mergekit"] = [Method("mergekit-moe `hidden` (0.1.5)", None)]
    return [method for name in chosen for method in rows[name]]


METHODS = ("mergekit", "class_mean", *GATE_MODE_SPECS)  # baselines, then every gate mode moemerge has


def summarise(name: str, runs: list[dict], oracle_mean: float) -> dict:
    """Mean over runs of every figure, and the spread of the headline (mean perplexity vs the oracle)."""
    acc = (
        [sum(r["accuracy"][i] for r in runs) / len(runs) for i in range(len(DOMAINS))]
        if "accuracy" in runs[0]
        else None
    )
    ppl = [sum(r["perplexity"][i] for r in runs) / len(runs) for i in range(len(DOMAINS))]
    vs = [100 * (sum(r["perplexity"]) / len(DOMAINS) / oracle_mean - 1) for r in runs]
    return {"method": name, "runs": len(runs), "accuracy": acc, "perplexity": ppl, "vs_oracle": vs}


def table(rows: list[dict]) -> str:
    """Markdown: means over runs; the last column's range is over runs."""
    head = ["method", "runs", *(f"acc {d}" for d in DOMAINS), *(f"ppl {d}" for d in DOMAINS), "mean ppl"]
    lines = ["| " + " | ".join([*head, "vs oracle (min–max)"]) + " |", "|" + "---|" * (len(head) + 1)]
    for row in rows:
        vs = row["vs_oracle"]
        spread = f" ({min(vs):+.1f}% – {max(vs):+.1f}%)" if len(vs) > 1 else ""
        cells = [
            row["method"],
            str(row["runs"]),
            *(f"{a:.2f}" if row["accuracy"] else "—" for a in (row["accuracy"] or DOMAINS)),
            *(f"{x:.2f}" for x in row["perplexity"]),
            f"{sum(row['perplexity']) / len(DOMAINS):.2f}",
            f"{sum(vs) / len(vs):+.1f}%{spread}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], domains: list[str], caption: str) -> bytes:
    """Routing accuracy per domain and mean perplexity against the oracle, per method (means over runs)."""
    names = [
        row["method"].replace("moemerge ", "").replace("`", "").replace(" (each expert on its domain)", "")
        for row in rows
    ]
    accuracy = {d: [row["accuracy"][i] if row["accuracy"] else None for row in rows] for i, d in enumerate(domains)}
    excess = {"mean": [sum(row["vs_oracle"]) / len(row["vs_oracle"]) for row in rows]}
    charts = {"routing accuracy (top-1 = domain)": accuracy, "mean perplexity vs oracle (%)": excess}
    return plots.grouped_bars(names, charts, caption)


def machine() -> str:
    """CPU model, cores and Python, in one line."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-routing"))
    parser.add_argument("--methods", default=",".join(METHODS), help="run order; the table keeps the default order")
    parser.add_argument("--gate-scales", default="3,10,30,100", help="hidden-gate rows")
    parser.add_argument("--runs", type=int, default=3, help="prompt subsets (or seeds) per varying method")
    parser.add_argument("--train-prompts", type=int, default=100, help="labelled prompts per expert (trained)")
    parser.add_argument("--heldout", type=int, default=12, help="held-out texts per domain")
    parser.add_argument("--mergekit", default="mergekit-moe", help="mergekit-moe 0.1.5, in its own venv")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the table's rows")
    parser.add_argument("--plot-only", action="store_true", help="only draw --figure from an earlier --json")
    args = parser.parse_args()
    if args.plot_only:
        if not (args.json and args.figure):
            parser.error("--plot-only reads --json and writes --figure")
        report = json.loads(args.json.read_text())
        write_figure(args.figure, report["rows"], report["domains"], report["invocation"], report["date"])
        return
    chosen = [m for m in args.methods.split(",") if m]
    if unknown := set(chosen) - set(METHODS):
        parser.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = build_base(ROOT / "examples" / ".cache" / "smollm2-base")
    texts = heldout(args.heldout)
    by_domain = [[t for t, label in texts if label == i] for i in range(len(DOMAINS))]
    oracle = [dense_perplexity(base, ADAPTERS / d, by_domain[i]) for i, d in enumerate(DOMAINS)]
    oracle_mean = sum(oracle) / len(oracle)
    runs: list[dict] = [
        {"method": "oracle (each expert on its domain)", "perplexity": oracle},
        {"method": "base alone", "perplexity": [dense_perplexity(base, None, t) for t in by_domain]},
    ]
    rows = [summarise(r["method"], [r], oracle_mean) for r in runs]
    print(table(rows), flush=True)
    dataset = write_dataset(args.workdir / "train.csv", args.train_prompts)
    scales = [float(s) for s in args.gate_scales.split(",") if s]
    for method in methods(chosen, scales, dataset):
        if method.gate_mode is None and not shutil.which(args.mergekit):
            print(f"skipping {method.name}: {args.mergekit} not found", flush=True)
            continue
        done = []
        for k in range(1 if method.varies == "once" else args.runs):
            subset, seed = (k, k) if method.varies == "prompts" else (0, k)  # generated: its texts follow the seed
            if method.gate_mode is None:
                spec = recipe(base, "hidden", subset, {}, dense_folders(base, args.workdir))
                out, seconds = run_mergekit(args.workdir, args.mergekit, spec)
            else:
                spec = recipe(base, method.gate_mode, subset, method.extra)
                out, seconds = run_moemerge(args.workdir, method.gate_mode, spec, seed, method.patches)
            done.append({"method": method.name, "subset": subset, "seed": seed, "seconds": seconds})
            done[-1].update(score_moe(out, texts))
            print(json.dumps(done[-1]), flush=True)
        runs.extend(done)
        rows.append(summarise(method.name, done, oracle_mean))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        order = [m.name for m in methods(list(METHODS), sorted(scales), dataset)]
        rows[2:] = sorted(rows[2:], key=lambda row: order.index(row["method"]))
        write(args, oracle, rows, runs)  # after every method: a stopped session keeps what it measured
    print("\n" + (args.markdown.read_text() if args.markdown else table(rows)))


def write(args: argparse.Namespace, oracle: list[float], rows: list[dict], runs: list[dict]) -> None:
    """The JSON of every run so far and the markdown table made from them, headed by command, date, machine."""
    invocation = "python benchmarks/routing_quality.py " + " ".join(sys.argv[1:])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        result = {"invocation": invocation, "date": date, "machine": machine(), "domains": DOMAINS}
        args.json.write_text(json.dumps({**result, "oracle": oracle, "rows": rows, "runs": runs}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(f"`{invocation}` — {date}, {machine()}\n\n{table(rows)}\n")
    if args.figure:
        write_figure(args.figure, rows, DOMAINS, invocation, date)


def write_figure(path: Path, rows: list[dict], domains: list[str], invocation: str, date: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure(rows, domains, f"routing quality on SmolLM2-135M + 3 LoRA experts, {date}"))
    print(f"wrote {path} (from `{invocation}`)")


if __name__ == "__main__":
    main()
