"""Recipe values, options and data files out of range: refused up front in one `error:` line naming the key,
option, file or line, with the work folder byte for byte as before. And numeric faults blamed on their real
cause: a float16 overflow names the tensor and the dtype; a full disk after the shards names the output."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from support.hostile import assert_refused, run_cli, tree
from support.paths import CLI
from support.tiny_models import write_recipe


def recipe(work: Path, experts: list | None = None, **fields) -> Path:
    return write_recipe(work / "r.yaml", work / "base", experts or [work / "e1", work / "e2"], **fields)


def edited(work: Path, edit: Callable[[dict], None], **fields) -> Path:
    path = recipe(work, **fields)
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def set_key(*keys, value):
    def edit(data: dict) -> None:
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {}) if isinstance(key, str) else target[key]
        target[keys[-1]] = value

    return edit


def rows(work: Path, text: str, name: str = "d.csv", encoding: str = "utf-8") -> str:
    (work / name).write_text(text, encoding=encoding)
    return str(work / name)


TRAIN = "prompt,expert\n" + "".join(f"{'ab'[i % 2] * 5} {i},{i % 2}\n" for i in range(8))
INF, NAN = float("inf"), float("nan")


# name → work folder → (arguments after `moemerge`, parts of the error line)
def cases() -> dict[str, Callable[[Path], tuple[list, tuple[str, ...]]]]:
    def option(*args, expect):
        return lambda w: ([recipe(w, gate_mode="random"), w / "out", *args], expect)

    def value(edit, *expect, **fields):
        return lambda w: ([edited(w, edit, **fields), w / "out"], expect)

    def raw(text_of, *expect):
        def make(w):
            (w / "r.yaml").write_text(text_of(w))
            return [w / "r.yaml", w / "out"], expect

        return make

    def prompts_file(line: str, *expect):
        def make(w):
            (w / "p.jsonl").write_text('{"prompt": "fine"}\n' + line + "\n")
            entry = {"source_model": str(w / "e1"), "positive_prompts_file": str(w / "p.jsonl")}
            return [recipe(w, [entry, w / "e2"]), w / "out"], ("p.jsonl: line 2", *expect)

        return make

    def dataset(text: str, *expect, **fields):
        def make(w):
            path = rows(w, text)
            return [recipe(w, gate_mode="trained", dataset_csv=path, **fields), w / "out"], expect

        return make

    def tokenizer(damage: Callable[[Path], None]):
        def make(w):
            damage(w / "base")
            return [recipe(w), w / "out"], ("base: its tokenizer cannot be loaded", "the gates need it")

        return make

    def no_tokenizer(folder: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)

    def corrupt_tokenizer(folder: Path) -> None:
        (folder / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": 42}}')

    return {
        "shard_size_inf": option("--shard-size", "inf", expect=("--shard-size 'inf'",)),
        "shard_size_nan": option("--shard-size", "nanGB", expect=("--shard-size 'nanGB'",)),
        "shard_size_huge": option("--shard-size", "1e400GB", expect=("--shard-size '1e400GB'",)),
        "seed_2_70": option("--seed", str(2**70), expect=(f"--seed {2**70}", "less than or equal")),
        "seed_negative": option("--seed", "-1", expect=("--seed -1", "greater than or equal to 0")),
        "batch_size_zero": option("--batch-size", "0", expect=("--batch-size 0",)),
        "gate_scale_inf": value(set_key("gate_scale", value=INF), "gate_scale", "finite"),
        "gate_scale_nan": value(set_key("gate_scale", value=NAN), "gate_scale", "finite"),
        "gate_scale_huge": value(set_key("gate_scale", value=1e300), "gate_scale", "less than or equal"),
        "residual_scale_inf": value(set_key("experts", 0, "residual_scale", value=INF), "experts[0].residual_scale"),
        "noise_scale_nan": value(set_key("experts", 1, "noise_scale", value=NAN), "experts[1].noise_scale"),
        "lr_inf": value(set_key("training", "lr", value=INF), "training.lr", "finite"),
        "lr_nan": value(set_key("training", "lr", value=NAN), "training.lr"),
        "training_seed_2_70": value(set_key("training", "seed", value=2**70), "training.seed"),
        "training_layer_negative": value(set_key("training", "layers", value=[-1]), "training.layers[0]"),
        "duplicate_top_key": raw(
            lambda w: (
                f"base_model: {w / 'base'}\ngate_mode: random\ngate_mode: hidden\n"
                f"experts:\n  - source_model: {w / 'e1'}\n  - source_model: {w / 'e2'}\n"
            ),
            "r.yaml: line 3",
            "duplicate key 'gate_mode'",
        ),
        "duplicate_expert_key": raw(
            lambda w: (
                f"base_model: {w / 'base'}\ngate_mode: random\nexperts:\n"
                f"  - source_model: {w / 'e1'}\n    source_model: {w / 'e2'}\n  - source_model: {w / 'e2'}\n"
            ),
            "duplicate key 'source_model'",
        ),
        "jsonl_null": prompts_file('{"prompt": null}', "prompt or text field holding text"),
        "jsonl_number": prompts_file("42", "JSON object"),
        "jsonl_list": prompts_file('["a prompt"]', "JSON object"),
        "jsonl_nested_number": prompts_file('{"text": 7}', "holding text"),
        "csv_superscript_label": dataset("prompt,expert\nabc,\u00b2\n", "d.csv: row 2: unknown expert '\u00b2'"),
        "csv_arabic_digit": dataset("prompt,expert\nabc,\u0661\n", "d.csv: row 2: unknown expert"),
        "holdout_leaves_nothing": dataset(
            "prompt,expert\naaaa,0\naaab,0\nbbbb,1\nbbba,1\n",
            "training.holdout 0.9",
            "holds out every d.csv row of e1",
            training={"holdout": 0.9},
        ),
        "no_base_tokenizer": tokenizer(no_tokenizer),
        "corrupt_base_tokenizer": tokenizer(corrupt_tokenizer),
        "chat_max_tokens_negative": lambda w: (["chat", w / "base", "--max-tokens", "-5"], ("--max-tokens",)),
        "chat_temperature_negative": lambda w: (["chat", w / "base", "--temperature", "-1"], ("--temperature",)),
    }


CASES = cases()


@pytest.mark.parametrize("name", CASES)
def test_out_of_range_value_is_refused(work, name):
    args, expect = CASES[name](work)
    before = tree(work)
    assert_refused(run_cli(*args, "--device", "cpu") if args[0] != "chat" else run_cli(*args), *expect)
    assert tree(work) == before


def test_yaml_merge_keys_may_still_override_an_anchor(work):
    """`<<: *defaults` then a key of its own is YAML's override, not a duplicate."""
    text = (
        f"base_model: {work / 'base'}\ngate_mode: random\ndtype: float32\nexperts:\n"
        f"  - &one\n    source_model: {work / 'e1'}\n    noise_scale: 0.5\n"
        f"  - <<: *one\n    source_model: {work / 'e2'}\n"
    )
    (work / "r.yaml").write_text(text)
    result = run_cli(work / "r.yaml", work / "out", "--device", "cpu")
    assert result.rc == 0, result.stderr
    manifest = json.loads((work / "out" / "moemerge.json").read_text())
    assert manifest["recipe"]["experts"][1]["source_model"] == str(work / "e2")
    assert manifest["recipe"]["experts"][1]["noise_scale"] == 0.5


def test_csv_with_a_byte_order_mark_is_read(work):
    path = rows(work, TRAIN, encoding="utf-8-sig")
    assert (work / "d.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    made = recipe(work, gate_mode="trained", dataset_csv=path, training={"steps": 3})
    result = run_cli(made, work / "out", "--device", "cpu")
    assert result.rc == 0, result.stderr
    report = json.loads((work / "out" / "gate_training.json").read_text())
    assert report["train_prompts"] + report["holdout_prompts"] == 8


def test_float16_overflow_names_the_tensor_and_the_dtype(work):
    """A float32 expert whose weight exceeds float16's range: the dtype is the cause, not the weights."""
    weights = work / "e1" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = 1e6
    save_file(tensors, str(weights))
    made = recipe(work, gate_mode="random")
    before = tree(work)
    result = run_cli(made, work / "out", "--dtype", "float16", "--device", "cpu")
    line = assert_refused(result, "model.layers.1.mlp.up_proj.weight", "overflow float16", "1e+06", "use dtype")
    assert "fix the source weights" not in line
    assert tree(work) == before


def test_non_finite_source_is_still_blamed_on_the_source(work):
    weights = work / "e1" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("inf")
    save_file(tensors, str(weights))
    result = run_cli(recipe(work, gate_mode="random"), work / "out", "--dtype", "float16", "--device", "cpu")
    assert_refused(result, "experts[0] model.layers.1.mlp.up_proj.weight", "fix the source weights")


def _small_files_only() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() rather than death by signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))


def test_disk_full_after_the_shards_names_the_output(work):
    """The shards fit; the base's chat template (a side file copied after them) does not: the message names
    the output being written, not the base file it was copied from."""
    (work / "base" / "chat_template.jinja").write_text("{{ messages }}" * 60_000)  # ~840 KB > the 400 KB limit
    out = work / "out"
    made = recipe(work, gate_mode="random")
    before = tree(work)
    run = subprocess.run(
        [CLI, made, out, "--shard-size", "100KB"],
        capture_output=True,
        text=True,
        preexec_fn=_small_files_only,
        env={**os.environ, "COLUMNS": "400"},
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert lines[0].startswith(f"error: could not write {out}: File too large"), lines[0]
    assert "chat_template" not in lines[0] and str(work / "base") not in lines[0]
    assert tree(work) == before
