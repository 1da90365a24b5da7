"""Routing quality on a real model: SmolLM2-135M + three domain LoRA experts, every gate mode side by side.

For each method the MoE is merged from the same recipe (same 5 prompts per expert for prompt-based gates),
then scored on held-out text of each domain (files and generated items never seen in training or prompts):
routing accuracy (top-1 router choice equals the text's domain, all layers, all tokens) and perplexity.
The oracle is each expert alone (base + its adapter, dense) on its own domain.

    python benchmarks/routing_quality.py                      # all methods, results table
    python benchmarks/routing_quality.py --methods hidden --gate-scales 1,3,10,30,100
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from build_base import build_base  # noqa: E402
from domains import DOMAINS, domain_texts, short_prompts  # noqa: E402

from moemerge import MergeOptions, merge  # noqa: E402
from moemerge.evaluate import evaluate  # noqa: E402
from moemerge.lora import LoraAdapter  # noqa: E402
from moemerge.routing import load_moe  # noqa: E402

ADAPTERS = ROOT / "examples" / "adapters"


def recipe(base: Path, gate_mode: str, prompts: int, extra: dict, dense: dict[str, Path] | None = None) -> dict:
    """The same experts and prompts for every method; mergekit gets full expert folders (its `base+adapter`
    form fails in mergekit-moe 0.1.5 with "LoRA not merged")."""
    experts = []
    for domain in DOMAINS:
        source = str(dense[domain]) if dense else str(ADAPTERS / domain)
        entry = {"source_model": source, "positive_prompts": short_prompts(domain, prompts)}
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


def run_moemerge(work: Path, name: str, spec: dict) -> tuple[Path, float]:
    (work / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.perf_counter()
    merge(work / f"{name}.yaml", work / name, MergeOptions(force=True, device="cpu"))
    return work / name, time.perf_counter() - started


def run_mergekit(work: Path, exe: str, spec: dict) -> tuple[Path, float]:
    (work / "mergekit.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.rmtree(work / "mergekit", ignore_errors=True)
    started = time.perf_counter()
    subprocess.run(
        [
            exe,
            str(work / "mergekit.yaml"),
            str(work / "mergekit"),
            "--device",
            "cpu",
            "--quiet",
        ],
        check=True,
    )
    return work / "mergekit", time.perf_counter() - started


def table(rows: list[dict], oracle: list[float]) -> str:
    head = [
        "method",
        *(f"acc {d}" for d in DOMAINS),
        *(f"ppl {d}" for d in DOMAINS),
        "mean ppl",
        "vs oracle",
        "merge s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    oracle_mean = sum(oracle) / len(oracle)
    for row in rows:
        ppl = row.get("perplexity") or oracle
        mean = sum(ppl) / len(ppl)
        acc = row.get("accuracy")
        cells = [
            row["method"],
            *(f"{a:.2f}" if acc else "—" for a in (acc or DOMAINS)),
            *(f"{p:.2f}" for p in ppl),
            f"{mean:.2f}",
            f"{100 * (mean / oracle_mean - 1):+.1f}%",
            f"{row.get('seconds', 0):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-routing"))
    parser.add_argument("--methods", default="random,cheap_embed,hidden,trained,mergekit")
    parser.add_argument("--gate-scales", default="", help="extra hidden-gate runs, e.g. 1,3,30")
    parser.add_argument("--prompts", type=int, default=5, help="prompts per expert for prompt-based gates")
    parser.add_argument("--train-prompts", type=int, default=100, help="labelled prompts per expert (trained)")
    parser.add_argument("--heldout", type=int, default=12, help="held-out texts per domain")
    parser.add_argument("--mergekit", default=str(Path("/work/mkvenv/bin/mergekit-moe")))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = build_base(ROOT / "examples" / ".cache" / "smollm2-base")
    texts = heldout(args.heldout)
    by_domain = [[t for t, label in texts if label == i] for i in range(len(DOMAINS))]
    oracle = [dense_perplexity(base, ADAPTERS / d, by_domain[i]) for i, d in enumerate(DOMAINS)]
    rows = [
        {"method": "oracle (each expert on its domain)", "perplexity": oracle},
        {"method": "base alone", "perplexity": [dense_perplexity(base, None, t) for t in by_domain]},
    ]
    print(table(rows, oracle), flush=True)
    methods = [m for m in args.methods.split(",") if m]
    runs: list[tuple[str, dict | None]] = []
    for method in methods:
        if method == "trained":
            dataset = write_dataset(args.workdir / "train.csv", args.train_prompts)
            runs.append(("trained", recipe(base, "trained", args.prompts, {"dataset_csv": str(dataset)})))
        elif method == "mergekit":
            runs.append(("mergekit-moe hidden", None))
        else:
            runs.append((method, recipe(base, method, args.prompts, {})))
    for scale in [float(s) for s in args.gate_scales.split(",") if s]:
        runs.append((f"hidden, gate_scale {scale:g}", recipe(base, "hidden", args.prompts, {"gate_scale": scale})))
    for name, spec in runs:
        if spec is None:
            if not Path(args.mergekit).exists():
                print(f"skipping mergekit-moe: {args.mergekit} not found", flush=True)
                continue
            spec = recipe(base, "hidden", args.prompts, {}, dense_folders(base, args.workdir))
            out, seconds = run_mergekit(args.workdir, args.mergekit, spec)
        else:
            out, seconds = run_moemerge(args.workdir, name.replace(" ", "_").replace(",", ""), spec)
        rows.append({"method": name, "seconds": seconds, **score_moe(out, texts)})
        print(table(rows[-1:], oracle).splitlines()[-1], flush=True)
    print()
    print(table(rows, oracle))
    if args.json:
        args.json.write_text(json.dumps({"domains": DOMAINS, "oracle": oracle, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
