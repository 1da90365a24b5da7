"""tests/compat/check_consumers.py compares llama.cpp's MoE and dense perplexities itself: the comparison, on canned
llama-perplexity outputs (llama.cpp is not installed here) and through a stand-in binary that prints them."""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # loads outputs in transformers, vLLM-style and llama.cpp consumers

spec = importlib.util.spec_from_file_location(
    "check_consumers", Path(__file__).parent / "compat" / "check_consumers.py"
)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def llama_log(chunks: list[str], final: str | None) -> str:
    """What llama-perplexity prints (tools/perplexity/perplexity.cpp): loader lines on stderr, then
    `[i]ppl,` per chunk and `Final estimate: PPL = %.4lf +/- %.5lf`."""
    lines = [
        "llama_model_loader: loaded meta data with 34 key-value pairs and 303 tensors from model.gguf",
        "perplexity: calculating perplexity over 3 chunks, n_ctx=64, batch_size=2048, n_seq=32",
        "perplexity: 0.21 seconds per pass - ETA 0.00 minutes",
        "".join(f"[{i + 1}]{c}," for i, c in enumerate(chunks)),
    ]
    if final is not None:
        lines.append(f"Final estimate: PPL = {final} +/- 0.51234")
    return "\n".join(lines) + "\n"


DENSE = llama_log(["8.1234", "8.5012", "8.6322"], "8.6322")
MOE_COPIES = llama_log(["8.1240", "8.5019", "8.6330"], "8.6330")
MOE_UNNORMALISED = llama_log(["9.2210", "9.6532", "9.8115"], "9.8115")  # Qwen2-MoE in llama.cpp (README)
NAN = llama_log(["nan", "nan", "nan"], "nan")
CRASH = "llama_model_load: error loading model: missing tensor 'blk.0.ffn_gate_exps.weight'\n"


def test_parse_perplexity():
    assert check.parse_perplexity(DENSE) == (8.6322, "PPL 8.6322")
    assert check.parse_perplexity(NAN)[0] is None and "NaN" in check.parse_perplexity(NAN)[1]
    ppl, why = check.parse_perplexity(CRASH)
    assert ppl is None and "missing tensor" in why
    assert check.parse_perplexity(llama_log(["5.1"], "inf"))[0] is None


@pytest.mark.parametrize(
    ("dense", "moe", "ok"),
    [
        (8.6322, 8.6330, True),  # SmolLM2, 3 copies → Mixtral: 9.3e-5 apart
        (49920.5250, 49920.5278, True),  # tiny Qwen3 copies: 5.6e-8 apart
        (8.6322, 9.8115, False),  # Qwen2-MoE in llama.cpp: 13.7% apart
        (8.6322, 8.6322 * 1.002, False),  # just outside the default 1e-3
        (8.6322, 8.6322 * 0.998, False),  # on either side
        (None, 8.6330, False),
        (8.6322, None, False),
    ],
)
def test_compare_perplexity(dense, moe, ok):
    row = check.compare_perplexity(dense, moe, rtol=1e-3)
    assert row["ok"] is ok, row


@pytest.fixture
def fake_llama(tmp_path) -> Path:
    """A stand-in for llama-perplexity: prints the canned log named after the GGUF it is given (`-m NAME.gguf`)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for name, log in {"dense": DENSE, "copies": MOE_COPIES, "qwen2": MOE_UNNORMALISED, "nan": NAN}.items():
        (logs / f"{name}.log").write_text(log)
    binary = tmp_path / "llama-perplexity"
    binary.write_text(
        f"#!{sys.executable}\n"
        "import sys, pathlib\n"
        "model = pathlib.Path(sys.argv[sys.argv.index('-m') + 1]).stem\n"
        f"log = pathlib.Path({str(logs)!r}) / (model + '.log')\n"
        "if model == 'crash_after':  # prints an estimate, then fails\n"
        "    sys.stdout.write(" + repr(DENSE) + ")\n"
        "    sys.exit(134)\n"
        "if not log.exists():\n"
        "    sys.stderr.write(" + repr(CRASH) + ")\n"
        "    sys.exit(1)\n"
        "sys.stdout.write(log.read_text())\n"
    )
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


@pytest.mark.parametrize(
    ("moe", "ok", "words"),
    [
        ("copies", True, "MoE 8.6330 vs dense 8.6322"),
        ("qwen2", False, "MoE 9.8115 vs dense 8.6322"),
        ("nan", False, "a perplexity is missing"),
        ("broken", False, "a perplexity is missing"),
        ("crash_after", False, "a perplexity is missing"),
    ],
)
def test_perplexity_rows_run_both_models_and_compare(fake_llama, tmp_path, moe, ok, words):
    rows = check.perplexity_rows(str(fake_llama), tmp_path / f"{moe}.gguf", tmp_path / "dense.gguf", tmp_path, 1e-3)
    assert [r["consumer"] for r in rows] == [
        "llama.cpp perplexity",
        "llama.cpp perplexity (dense)",
        "llama.cpp MoE vs dense",
    ]
    assert rows[1]["ok"] and rows[2]["ok"] is ok and words in rows[2]["detail"], rows
    assert all(r["ok"] for r in rows) is ok  # the script's exit status follows


def test_without_a_dense_model_only_the_moe_runs(fake_llama, tmp_path):
    rows = check.perplexity_rows(str(fake_llama), tmp_path / "copies.gguf", None, tmp_path, 1e-3)
    assert len(rows) == 1 and rows[0]["ok"] and "PPL 8.6330" in rows[0]["detail"]
