"""Train one small LoRA adapter per domain for the built-in example.

By default each adapter touches only the MLP projections (gate/up/down), because
those are exactly the weights that become Mixtral experts; attention stays shared.
With ``--attention`` it adapts q/k/v/o as well (written to examples/adapters_attn/):
stand-ins for full fine-tunes, whose attention the non_expert_weights policy keeps.
After each domain we print base vs adapted perplexity on every domain's
held-out text, so we can check each adapter helps its own domain most.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from build_base import DEFAULT_OUT, build_base
from domains import DOMAINS, domain_texts
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

HERE = Path(__file__).resolve().parent
ADAPTERS_DIR = HERE / "adapters"
ATTENTION_ADAPTERS_DIR = HERE / "adapters_attn"
BASE_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET_MODULES = ["gate_proj", "up_proj", "down_proj"]
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
SAVE_DTYPE = torch.float16  # more mantissa than bfloat16; LoRA weights are small, so range is no issue
EVAL_TEXTS = 20
EVAL_MAX_TOKENS = 256


def load_base(base_dir: Path) -> PreTrainedModel:
    """Fresh float32 copy of the base model (LoRA injection mutates it in place)."""
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def pack_blocks(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int, count: int) -> torch.Tensor:
    """Join texts with EOS into one token stream and cut ``count`` blocks of ``seq_len``.

    Packing wastes no compute on padding; if the texts run short we wrap around.
    """
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    needed = count * seq_len
    while len(stream) < needed:
        stream.extend(stream[: needed - len(stream)])
    return torch.tensor(stream[:needed], dtype=torch.long).view(count, seq_len)


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> float:
    """Token-weighted perplexity over ``texts``, each truncated to EVAL_MAX_TOKENS."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=EVAL_MAX_TOKENS)["input_ids"]
        if len(ids) < 2:
            continue
        batch = torch.tensor([ids])
        loss = model(input_ids=batch, labels=batch).loss
        total_nll += loss.item() * (len(ids) - 1)
        total_tokens += len(ids) - 1
    return math.exp(total_nll / total_tokens)


def eval_all(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """Perplexity on every domain's held-out split."""
    return {d: perplexity(model, tokenizer, domain_texts(d, "heldout", EVAL_TEXTS)) for d in DOMAINS}


def lora_config(attention: bool = False) -> LoraConfig:
    """MLP LoRA (these weights map one-to-one onto Mixtral expert weights), plus q/k/v/o with `attention`."""
    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGET_MODULES + (ATTENTION_MODULES if attention else []),
        bias="none",
        task_type="CAUSAL_LM",
    )


def train_adapter(
    base_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    domain: str,
    steps: int,
    batch: int,
    seq_len: int,
    lr: float,
    attention: bool = False,
    start_from: Path | None = None,
) -> PeftModel:
    """Train a LoRA adapter on the domain's "train" split with AdamW and a linear decay; with `start_from`
    (an adapter folder), the modules it adapts start from its weights, the others from PEFT's init."""
    torch.manual_seed(0)
    model = get_peft_model(load_base(base_dir), lora_config(attention))
    if start_from is not None:
        result = set_peft_model_state_dict(model, load_file(start_from / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise SystemExit(f"error: {start_from}: weights this adapter lacks: {result.unexpected_keys[0]}")
    texts = domain_texts(domain, "train", max(steps * batch, 1))
    blocks = pack_blocks(tokenizer, texts, seq_len, steps * batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        x = blocks[step * batch : (step + 1) * batch]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(
                f"  [{domain}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    return model


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """Save in PEFT folder format with half-precision weights and the Hub id as base.

    The Hub id is written into adapter_config.json after saving: set before,
    PEFT would try to reach the Hub to check the vocabulary, and we are offline.
    """
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(SAVE_DTYPE)
    model.save_pretrained(out_dir)
    tidy_adapter_dir(out_dir)


def tidy_adapter_dir(out_dir: Path) -> None:
    """Make the saved folder portable and reproducible.

    Points ``base_model_name_or_path`` at the Hub id, sorts ``target_modules``
    (PEFT writes a set, whose order changes between runs) and drops PEFT's
    empty model-card template, which only records our local cache path.
    """
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_REPO_ID
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out_dir / "README.md").unlink(missing_ok=True)


def dir_size_mb(path: Path) -> float:
    """Total size of the files in a folder, in MB."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def print_table(base: dict[str, float], adapted: dict[str, dict[str, float]]) -> None:
    """Rows: model; columns: held-out domain; lower is better."""
    print(f"{'held-out ppl':<14}" + "".join(f"{d:>10}" for d in DOMAINS))
    print(f"{'base':<14}" + "".join(f"{base[d]:>10.2f}" for d in DOMAINS))
    for name, row in adapted.items():
        print(f"{'+' + name:<14}" + "".join(f"{row[d]:>10.2f}" for d in DOMAINS))


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--base", type=Path, default=DEFAULT_OUT, help="base model folder (built if missing)")
    parser.add_argument("--attention", action="store_true", help="adapt q/k/v/o as well as the MLP")
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity tables (saves minutes)")
    parser.add_argument("--out", type=Path, default=None, help="adapters go to OUT/<domain> (default: by --attention)")
    parser.add_argument(
        "--start-from", type=Path, help="warm start from the adapters in START_FROM/<domain> (e.g. examples/adapters)"
    )
    args = parser.parse_args()
    out = args.out or (ATTENTION_ADAPTERS_DIR if args.attention else ADAPTERS_DIR)

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    base_dir = build_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base_ppl = {} if args.no_eval else eval_all(load_base(base_dir), tokenizer)
    print(f"base ready in {time.perf_counter() - t0:.0f}s", flush=True)

    adapted: dict[str, dict[str, float]] = {}
    for domain in args.domains:
        t1 = time.perf_counter()
        model = train_adapter(
            base_dir,
            tokenizer,
            domain,
            args.steps,
            args.batch,
            args.seq_len,
            args.lr,
            args.attention,
            args.start_from / domain if args.start_from else None,
        )
        train_s = time.perf_counter() - t1
        out_dir = out / domain
        save_adapter(model, out_dir)
        del model
        print(f"[{domain}] trained in {train_s:.0f}s, saved {out_dir} ({dir_size_mb(out_dir):.2f} MB)", flush=True)
        if args.no_eval:
            continue
        # Evaluate what was written to disk, half-precision rounding included.
        reloaded = PeftModel.from_pretrained(load_base(base_dir), out_dir)
        adapted[domain] = eval_all(reloaded, tokenizer)
        print(f"[{domain}] evaluated in {time.perf_counter() - t1 - train_s:.0f}s")
        print_table(base_ppl, adapted)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
