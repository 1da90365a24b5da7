"""Part 3 of gpu_check.py: the real servers load what moemerge writes.

The demo is merged as Mixtral, Qwen2-MoE, Qwen2-MoE with moe_layers and Qwen3-MoE (from SmolLM2 given the
q/k norms Qwen3 attention has, all ones: a Llama base cannot become Qwen3-MoE as it is). For each output,
transformers' greedy tokens for the demo's three questions are compared with vLLM's (vllm_greedy.py, run by
vLLM's own interpreter), token by token for 32 tokens; the first difference is reported with both sides'
log-probabilities of both tokens. Then `moemerge serve --device DEVICE` must answer a chat request with its
routing.

vLLM comes from --vllm-python (an interpreter that imports it), else the venv cached in .gpu_check/vllm,
else one built there from --vllm-wheels DIR (pip --no-index: the GPU machine has no network), else this
interpreter if it imports vllm; with none of them that comparison is skipped with one line saying why.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from bounded import run_bounded
from demo import QUESTIONS
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moemerge import MergeOptions, merge

VLLM_REQUIREMENT = "vllm==0.33.0"
NEW_TOKENS = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SERVE_WAIT_S = 180


def head_scales(smollm2: Path, head_dim: int) -> dict[str, float]:
    """Per layer, the mean RMS of SmolLM2's q and k heads (before RoPE) over the demo's questions: the q/k norm
    weights that keep Qwen3's normalised heads near the sizes the weights were trained with."""
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    scales: dict[str, float] = {}

    def keep(name: str):
        def hook(_module, _inputs, output: torch.Tensor) -> None:
            heads = output.float().unflatten(-1, (-1, head_dim))
            scales[name] = float(heads.pow(2).mean(dim=-1).sqrt().mean())

        return hook

    for layer, block in enumerate(model.model.layers):
        block.self_attn.q_proj.register_forward_hook(keep(f"model.layers.{layer}.self_attn.q_norm.weight"))
        block.self_attn.k_proj.register_forward_hook(keep(f"model.layers.{layer}.self_attn.k_norm.weight"))
    with torch.inference_mode():
        model(**tokenizer(" ".join(QUESTIONS.values()), return_tensors="pt"))
    return scales


def qwen3_base(smollm2: Path, target: Path) -> Path:
    """SmolLM2 as a Qwen3 dense model: its weights plus q/k norms (Qwen3 attention normalises each head), set
    to each layer's typical head size so the model still writes text rather than noise."""
    if (target / "model.safetensors").is_file():
        return target
    config = json.loads((smollm2 / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    config |= {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": head_dim}
    config |= {"attention_bias": False, "use_sliding_window": False, "sliding_window": None}
    tensors = load_file(str(smollm2 / "model.safetensors"))
    for name, scale in head_scales(smollm2, head_dim).items():
        tensors[name] = torch.full((head_dim,), scale)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            shutil.copy2(smollm2 / name, partial / name)
    partial.rename(target)
    return target


def outputs(recipe: dict, base: Path, workdir: Path, device: str) -> dict[str, Path]:
    """The four outputs of the demo recipe, merged with hidden gates on `device`."""
    import yaml

    variants = {
        "mixtral": {},
        "qwen2_moe": {"architecture": "qwen2_moe"},
        "qwen2_moe-moe_layers": {"architecture": "qwen2_moe", "moe_layers": list(range(0, 30, 2))},
        "qwen3_moe": {"architecture": "qwen3_moe", "base_model": str(qwen3_base(base, workdir / "qwen3-base"))},
    }
    built = {}
    for name, changes in variants.items():
        path = workdir / "recipes" / f"servers-{name}.yaml"
        path.write_text(yaml.safe_dump({**recipe, "gate_mode": "hidden", **changes}, sort_keys=False, width=1000))
        built[name] = workdir / "out" / f"servers-{name}"
        merge(path, built[name], MergeOptions(device=device, force=True))
    return built


def question_ids(tokenizer) -> list[list[int]]:
    """The demo's questions through the chat template, as token ids (both sides get the same ids)."""
    ids = []
    for question in QUESTIONS.values():
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def transformers_greedy(out: Path, prompts: list[list[int]], device: str) -> list[dict[str, object]]:
    """Greedy tokens and each step's log-probabilities (all of them, as a [steps, vocab] tensor)."""
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    results = []
    for ids in prompts:
        with torch.inference_mode():
            generated = model.generate(
                torch.tensor([ids], device=device),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = generated.sequences[0, len(ids) :].tolist()
        logprobs = torch.log_softmax(torch.stack(generated.logits)[:, 0].float(), dim=-1).cpu()
        results.append({"tokens": tokens, "logprobs": logprobs})
    del model
    return results


def find_vllm(args, workdir: Path) -> tuple[Path | None, str]:
    """An interpreter that imports vllm, and how it was found; None and the reason when there is none."""
    venv_python = workdir / "vllm" / "bin" / "python"
    if args.vllm_python:
        return Path(args.vllm_python), "--vllm-python"
    if venv_python.is_file():
        return venv_python, f"cached venv {venv_python.parent.parent}"
    if args.vllm_wheels:
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv_python.parent.parent)], check=True
        )
        install = [str(venv_python), "-m", "pip", "install", "--no-index", "--find-links", str(args.vllm_wheels)]
        subprocess.run([*install, VLLM_REQUIREMENT], check=True)
        return venv_python, f"{VLLM_REQUIREMENT} from {args.vllm_wheels}"
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable), "this interpreter"
    return None, (
        "vLLM is not installed here and neither --vllm-python nor --vllm-wheels was given (the GPU machine has "
        "no network, and vLLM's wheels are far over the 64 MiB a call carries)"
    )


def vllm_greedy(python: Path, out: Path, prompts: list[list[int]], workdir: Path, timeout: float | None) -> list[dict]:
    """vllm_greedy.py in vLLM's interpreter: tokens and top-5 log-probabilities per step."""
    request, answer = workdir / "vllm-prompts.json", workdir / "vllm-answer.json"
    request.write_text(json.dumps(prompts))
    answer.unlink(missing_ok=True)
    script = Path(__file__).with_name("vllm_greedy.py")
    command = [str(python), str(script), str(out), str(request), str(answer), str(NEW_TOKENS)]
    run_bounded(command, workdir / f"vllm-{out.name}.log", timeout)
    return json.loads(answer.read_text())


def first_difference(ours: dict, theirs: dict) -> dict[str, object] | None:
    """Where transformers' and vLLM's greedy tokens first part, with both sides' log-probabilities of both
    tokens (vLLM's are from its top 5, None where a token is not among them); None when they agree."""
    a, b = ours["tokens"], theirs["tokens"]
    step = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if step is None:
        return None if len(a) == len(b) else {"step": min(len(a), len(b)), "lengths": [len(a), len(b)]}
    top = {int(token): value for token, value in theirs["logprobs"][step].items()}
    return {
        "step": step,
        "transformers_token": a[step],
        "vllm_token": b[step],
        "transformers_logprobs": [float(ours["logprobs"][step, a[step]]), float(ours["logprobs"][step, b[step]])],
        "vllm_logprobs": [top.get(a[step]), top.get(b[step])],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_answers(moemerge: Path, out: Path, device: str, workdir: Path) -> dict[str, object]:
    """`moemerge serve OUT --device DEVICE` answers one greedy chat request; its reply's routing."""
    port = free_port()
    log = workdir / "serve.log"
    command = [str(moemerge), "serve", str(out), "--port", str(port), "--device", device]
    with log.open("w") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_WAIT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moemerge serve did not come up; its log {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        body = {"messages": [{"role": "user", "content": QUESTIONS["math"]}], "max_tokens": 16, "temperature": 0}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    routing = reply.get("routing") or {}
    if not routing.get("experts") or "top_expert" not in routing:
        raise RuntimeError(f"moemerge serve replied without routing: {json.dumps(reply)[:500]}")
    return {"text": reply["choices"][0]["message"]["content"], "routing": routing}


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def servers(args, recipe: dict, base: Path, budget) -> tuple[str, str, dict[str, object]]:
    """(status, summary line, details) of part 3."""
    vllm, found = find_vllm(args, args.workdir)
    built = outputs(recipe, base, args.workdir, args.device)
    tokenizer = AutoTokenizer.from_pretrained(built["mixtral"])
    prompts = question_ids(tokenizer)
    details: dict[str, object] = {"vllm": found, "outputs": {}}
    pieces, failures = [], []
    for name, out in built.items():
        ours = transformers_greedy(out, prompts, args.device)
        entry: dict[str, object] = {"transformers_tokens": [r["tokens"] for r in ours]}
        if vllm is not None and budget.left() > 0:
            theirs = vllm_greedy(vllm, out, prompts, args.workdir, budget.timeout())
            differences = [first_difference(a, b) for a, b in zip(ours, theirs, strict=True)]
            entry |= {"vllm_tokens": [t["tokens"] for t in theirs], "first_differences": differences}
            same = sum(d is None for d in differences)
            pieces.append(f"{name} vLLM = transformers on {same}/{len(differences)} questions")
            if same < len(differences):
                failures.append(name)
        details["outputs"][name] = entry
    pieces.insert(0, f"transformers greedy {NEW_TOKENS} tokens on {len(built)} outputs x {len(prompts)} questions")
    served = serve_answers(args.moemerge, built["mixtral"], args.device, args.workdir)
    details["serve"] = served
    pieces.append(f"serve --device {args.device} answered with routing (top expert {served['routing']['top_expert']})")
    if vllm is None:
        pieces.append(f"vLLM skipped: {found}")
    status = "fail" if failures else ("pass" if vllm is not None else "measured")
    return status, "; ".join(pieces), details
