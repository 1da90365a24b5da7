"""Shard digests: each shard's sha256 is recorded in moemerge.json as it is written, equals the sha256 of
the file on disk (computed here with hashlib, independently of the writer), and `moemerge verify` fails on a
single flipped bit that leaves every value finite, naming the shard."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from support.hostile import assert_refused, run_cli
from support.tiny_models import make_base, make_expert, make_lora, write_recipe


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """Verbatim tensors (the expert's own weights, copied by the kernel), computed ones (a LoRA expert,
    gates) and several shards."""
    root = tmp_path_factory.mktemp("digests")
    base = make_base(root / "base")
    expert = make_expert(base, root / "expert", seed=1)
    make_lora(base, root / "lora", seed=2)
    recipe = write_recipe(root / "r.yaml", base, [expert, root / "lora"], gate_mode="random")
    result = run_cli(recipe, root / "out", "--shard-size", "30KB", "--device", "cpu")
    assert result.rc == 0, result.stderr
    return root / "out"


def test_recorded_digests_are_the_files_sha256(merged):
    recorded = json.loads((merged / "moemerge.json").read_text())["shard_sha256"]
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(recorded) == shards
    for shard in shards:
        assert recorded[shard] == hashlib.sha256((merged / shard).read_bytes()).hexdigest(), shard


def test_verify_fails_on_a_finite_bit_flip_naming_the_shard(merged, tmp_path):
    out = shutil.copytree(merged, tmp_path / "out")
    shard = sorted(out.glob("*.safetensors"))[1]
    raw = bytearray(shard.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header] ^= 0x01  # lowest mantissa bit of the first float32 value (little-endian): still finite
    shard.write_bytes(bytes(raw))
    assert_refused(run_cli("verify", out), shard.name, "sha256", "recorded when it was written")


def test_verify_accepts_the_untouched_output(merged):
    result = run_cli("verify", merged)
    assert result.rc == 0, result.stderr
