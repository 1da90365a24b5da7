"""A fuzzer over the model files a merge reads (safetensors headers and data, config.json, adapter_config.json),
not only recipes. Whatever hypothesis writes, `moemerge` either refuses it (exit 1, exactly one `error:` line,
no output folder) or merges it into an output that `moemerge verify --deep` accepts and whose expert tensors
are, byte for byte, what the safetensors library itself reads from the (mutated) source. Never a traceback,
never an internal error, never exit 0 with wrong bytes.

Merges run in this process (no interpreter start per example); the examples are derandomized, so CI runs the
same ones every time. Set MOEMERGE_FUZZ_EXAMPLES to run more."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from support.hostile import copy_sources, make_sources, run_cli, split_safetensors, write_safetensors
from support.tiny_models import read_tensors, write_recipe

pytestmark = pytest.mark.slow  # many generated hostile inputs, each a CLI run

EXAMPLES = int(os.environ.get("MOEMERGE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
WEIGHTS = "model.safetensors"
RAN: dict[str, int] = {}
VERIFIED: set[str] = set()  # outputs `verify --deep` accepted, by the sha256 of all their files


@pytest.fixture(scope="module")
def masters(tmp_path_factory) -> Path:
    return make_sources(tmp_path_factory.mktemp("fuzz"))


def json_values() -> st.SearchStrategy:
    """What a hostile file may hold where a number, string or list belongs."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.integers(min_value=-3, max_value=200),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
        max_leaves=5,
    )


def run_case(root: Path, masters: Path, prepare) -> None:
    """Copy the models, let `prepare` damage them, merge, and check the one allowed pair of outcomes."""
    work = Path(tempfile.mkdtemp(dir=root))
    try:
        copy_sources(masters, work)
        prepare(work)
        recipe = write_recipe(work / "r.yaml", work / "base", [work / "e1", work / "lora"], gate_mode="random")
        out = work / "out"
        result = run_cli(recipe, out, "--device", "cpu", "--shard-size", "40KB")
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
        if result.rc != 0:
            lines = result.lines()
            assert result.rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            assert not out.exists() and not list(work.glob(".out.moemerge-*"))
            return
        fingerprint = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(out.iterdir())))
        if fingerprint.hexdigest() not in VERIFIED:  # the same bytes were verified already: same answer
            checked = run_cli("verify", out)
            assert checked.rc == 0, checked.stderr
            VERIFIED.add(fingerprint.hexdigest())
        written = read_tensors(out)
        with safe_open(str(work / "e1" / WEIGHTS), framework="pt") as source:  # the library's own reading
            for layer in range(3):
                for projection, short in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                    want = source.get_tensor(f"model.layers.{layer}.mlp.{projection}.weight")
                    got = written[f"model.layers.{layer}.block_sparse_moe.experts.0.{short}.weight"]
                    assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# safetensors headers and data


@st.composite
def header_damage(draw) -> list[tuple]:
    """A few edits, each naming a tensor by its rank in the header (names are not known to hypothesis)."""
    edit = st.one_of(
        st.tuples(
            st.just("field"), st.integers(0, 50), st.sampled_from(["dtype", "shape", "data_offsets"]), json_values()
        ),
        st.tuples(st.just("shift"), st.integers(0, 50), st.integers(-64, 64)),
        st.tuples(st.just("swap"), st.integers(0, 50), st.integers(0, 50)),
        st.tuples(st.just("copy_offsets"), st.integers(0, 50), st.integers(0, 50)),
        st.tuples(
            st.just("dtype"), st.integers(0, 50), st.sampled_from(["F16", "BF16", "F64", "I32", "U8", "F8_E4M3", "f32"])
        ),
        st.tuples(st.just("transpose"), st.integers(0, 50)),
        st.tuples(st.just("drop"), st.integers(0, 50)),
        st.tuples(st.just("metadata"), json_values()),
        st.tuples(st.just("data"), st.integers(-4096, 64)),
    )
    return draw(st.lists(edit, min_size=1, max_size=3))


def damage_weights(file: Path, edits: list[tuple]) -> None:
    header, data = split_safetensors(file)
    names = sorted(k for k in header if k != "__metadata__")
    for kind, *args in edits:
        name = names[args[0] % len(names)] if kind not in ("metadata", "data") else None
        if kind == "field" and isinstance(header.get(name), dict):
            header[name][args[1]] = args[2]
        elif (
            kind == "shift"
            and isinstance(header.get(name), dict)
            and isinstance(header[name].get("data_offsets"), list)
        ):
            header[name]["data_offsets"] = [
                o + args[1] if isinstance(o, int) else o for o in header[name]["data_offsets"]
            ]
        elif kind in ("swap", "copy_offsets"):
            other = names[args[1] % len(names)]
            if isinstance(header.get(name), dict) and isinstance(header.get(other), dict):
                if kind == "swap":
                    header[name], header[other] = header[other], header[name]
                else:
                    header[name]["data_offsets"] = header[other].get("data_offsets")
        elif kind == "dtype" and isinstance(header.get(name), dict):
            header[name]["dtype"] = args[1]
        elif kind == "transpose" and isinstance(header.get(name), dict) and isinstance(header[name].get("shape"), list):
            header[name]["shape"] = header[name]["shape"][::-1]
        elif kind == "drop":
            header.pop(name, None)
        elif kind == "metadata":
            header["__metadata__"] = args[0]
        elif kind == "data":
            data = data[: len(data) + args[0]] if args[0] < 0 else data + bytes(args[0])
    write_safetensors(file, json.dumps(header, allow_nan=True), data)


def test_fuzz_safetensors(masters, tmp_path):
    @FUZZ
    @given(header_damage())
    def case(edits):
        RAN["safetensors"] = RAN.get("safetensors", 0) + 1
        run_case(tmp_path, masters, lambda work: damage_weights(work / "e1" / WEIGHTS, edits))

    case()


# ---------------------------------------------------------------------------------------------------------------
# config.json and adapter_config.json

CONFIG_KEYS = [
    "architectures",
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "hidden_act",
    "torch_dtype",
    "attention_bias",
    "sliding_window",
]
LORA_KEYS = [
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "peft_type",
    "use_dora",
]


def edit_json(file: Path, changes: dict, dropped: list[str]) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    for key in dropped:
        data.pop(key, None)
    file.write_text(json.dumps(data, allow_nan=True))


@FUZZ
@given(
    which=st.sampled_from(["base", "e1"]),
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values(), max_size=3),
    dropped=st.lists(st.sampled_from(CONFIG_KEYS), max_size=2),
)
def test_fuzz_model_config(masters, tmp_path, which, changes, dropped):
    RAN["config"] = RAN.get("config", 0) + 1
    run_case(tmp_path, masters, lambda work: edit_json(work / which / "config.json", changes, dropped))


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(LORA_KEYS), json_values(), max_size=3),
    dropped=st.lists(st.sampled_from(LORA_KEYS), max_size=2),
)
def test_fuzz_adapter_config(masters, tmp_path, changes, dropped):
    RAN["adapter_config"] = RAN.get("adapter_config", 0) + 1
    run_case(tmp_path, masters, lambda work: edit_json(work / "lora" / "adapter_config.json", changes, dropped))


def test_fuzz_examples_ran():
    """The count the closing report quotes; runs last in this file. Each fuzz test that ran did run all its
    examples, and some of them were merged into outputs that verify accepted (not only refused)."""
    print(f"fuzz examples run: {RAN} (total {sum(RAN.values())}); distinct outputs verified: {len(VERIFIED)}")
    if not RAN:
        pytest.skip("no fuzz test ran in this session")
    assert all(count == EXAMPLES for count in RAN.values()), RAN
    assert VERIFIED, "every example was refused: no merge was ever checked"
