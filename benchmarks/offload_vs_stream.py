"""Router inputs of a prompt set three ways: moemerge's layer stream, accelerate's disk offload, the whole model.

Each method runs in its own child process (its ru_maxrss is its own peak), on the same prompts, alternating
between repeats:

- stream: moemerge.gates.router_inputs.RouterInputs, each layer read from the safetensors files once;
- offload: transformers + accelerate with every decoder layer offloaded to disk (`device_map` "disk"; the
  weights stay in the base's safetensors files and are loaded by accelerate's hooks for every batch that
  passes through the layer), router inputs captured with forward hooks;
- whole: the whole base loaded, forward hooks (moemerge before the layer stream).

Every method keeps each layer's mean router input only (what a consumer reduces a capture to), so memory
shows the pass itself. Prompts are merge_speed.py's, on its generated models.

    python benchmarks/offload_vs_stream.py --size 1b --prompts 40 --repeats 2 --json /tmp/offload.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from merge_speed import SIZES, ensure_models, expert_prompts, vocabulary

METHODS = ("stream", "offload", "whole")
GIB = 2**30


def child(method: str, base: Path, prompts: list[str], batch_size: int) -> dict[str, float]:
    """Run one method here; the seconds it took and this process's peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moemerge.gates.router_inputs import CaptureOptions, RouterInputs, pad_ready
    from moemerge.inputs.sources import ModelSource

    started = time.perf_counter()
    tokenizer = pad_ready(AutoTokenizer.from_pretrained(base))
    options = CaptureOptions(torch.device("cpu"), torch.bfloat16, batch_size)
    inputs = RouterInputs(ModelSource(base, "base"), tokenizer, prompts, options, max_tokens=256)
    means: list[torch.Tensor] = []
    if method == "stream":
        means = [layer.mean(dim=0) for layer in inputs.layers()]
    else:
        with tempfile.TemporaryDirectory() as folder:
            layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
            device_map = None
            if method == "offload":
                device_map = {
                    name: "cpu" for name in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")
                }
                device_map |= {f"model.layers.{i}": "disk" for i in range(layers)}
            model = AutoModelForCausalLM.from_pretrained(
                base, dtype=torch.bfloat16, device_map=device_map, offload_folder=folder
            ).eval()
            sums = [torch.zeros(model.config.hidden_size) for _ in range(layers)]
            seen: list[torch.Tensor] = []
            for layer in model.model.layers:
                layer.post_attention_layernorm.register_forward_hook(lambda _m, _i, out: seen.append(out))
            for batch in inputs.batches:
                seen.clear()
                with torch.inference_mode():
                    model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                for i, hidden in enumerate(seen):
                    sums[i] += hidden[batch.real].float().sum(dim=0)
            means = [total / len(inputs.owners) for total in sums]
    assert len(means) > 0
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--prompts", type=int, default=40, help="prompts in all")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moemerge-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SIZES[args.size]
    base, _ = ensure_models(args.workdir, size, 0) if not args.child else (args.workdir, [])
    words = vocabulary(size.vocab)
    prompts = [p for e in range(4) for p in expert_prompts(words, e, 4, args.prompts // 4)]
    if args.child:
        print(json.dumps(child(args.child, base, prompts, args.batch_size)))
        return
    methods = [m for m in args.methods.split(",") if m]
    runs: list[dict[str, object]] = []
    for repeat in range(args.repeats):
        for method in methods if repeat % 2 == 0 else methods[::-1]:
            command = [sys.executable, __file__, "--child", method, "--size", args.size, "--workdir", str(base)]
            command += ["--prompts", str(args.prompts), "--batch-size", str(args.batch_size)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
            result = {"method": method, "repeat": repeat, **json.loads(out.stdout.splitlines()[-1])}
            print(result, file=sys.stderr, flush=True)
            runs.append(result)
    lines = ["| method | runs | median s | min–max s | peak RSS GiB |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        seconds = [float(r["seconds"]) for r in mine]
        peak = max(float(r["peak_rss_gib"]) for r in mine)
        lines.append(
            f"| {method} | {len(mine)} | {statistics.median(seconds):.1f} | {min(seconds):.1f}–{max(seconds):.1f} "
            f"| {peak:.2f} |"
        )
    print("\n".join(lines))
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args) | {"workdir": str(base)}}
        args.json.write_text(json.dumps({**meta, "runs": runs, "table": lines}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
