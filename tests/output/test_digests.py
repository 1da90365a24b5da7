"""Shard digests: each shard's xxh3-128 is recorded in moemerge.json as it is written, equals the xxh3-128
of the file on disk (computed here with xxhash, independently of the writer), and `moemerge verify` fails on
a single flipped bit that leaves every value finite, naming the shard, whichever algorithm the manifest
names: an output recorded with sha256 by an older moemerge still verifies, and its flipped bits are caught."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import xxhash
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


def shards_of(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


def as_older_moemerge_wrote_it(merged: Path, tmp_path: Path) -> Path:
    """A copy whose manifest records sha256 under the key moemerge used before xxh3 (hashed here with hashlib)."""
    out = shutil.copytree(merged, tmp_path / "old")
    manifest = json.loads((out / "moemerge.json").read_text())
    del manifest["shard_digests"]
    manifest["shard_sha256"] = {shard.name: hashlib.sha256(shard.read_bytes()).hexdigest() for shard in shards_of(out)}
    (out / "moemerge.json").write_text(json.dumps(manifest))
    return out


def flip_a_finite_bit(out: Path) -> Path:
    shard = shards_of(out)[1]
    raw = bytearray(shard.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header] ^= 0x01  # lowest mantissa bit of the first float32 value (little-endian): still finite
    shard.write_bytes(bytes(raw))
    return shard


def test_recorded_digests_are_the_files_xxh3_128(merged):
    recorded = json.loads((merged / "moemerge.json").read_text())["shard_digests"]
    assert recorded["algorithm"] == "xxh3_128"
    shards = [p.name for p in shards_of(merged)]
    assert len(shards) > 2 and sorted(recorded["shards"]) == shards
    for shard in shards:
        assert recorded["shards"][shard] == xxhash.xxh3_128((merged / shard).read_bytes()).hexdigest(), shard


def test_verify_fails_on_a_finite_bit_flip_naming_the_shard(merged, tmp_path):
    shard = flip_a_finite_bit(shutil.copytree(merged, tmp_path / "out"))
    assert_refused(run_cli("verify", tmp_path / "out"), shard.name, "xxh3_128", "recorded when it was written")


def test_verify_accepts_the_untouched_output(merged):
    result = run_cli("verify", merged)
    assert result.rc == 0, result.stderr


def test_an_output_recorded_with_sha256_still_verifies(merged, tmp_path):
    result = run_cli("verify", as_older_moemerge_wrote_it(merged, tmp_path))
    assert result.rc == 0, result.stderr


def test_verify_checks_sha256_where_the_manifest_records_it(merged, tmp_path):
    shard = flip_a_finite_bit(as_older_moemerge_wrote_it(merged, tmp_path))
    assert_refused(run_cli("verify", tmp_path / "old"), shard.name, "sha256", "recorded when it was written")


def test_an_algorithm_verify_does_not_know_is_named(merged, tmp_path):
    out = shutil.copytree(merged, tmp_path / "out")
    manifest = json.loads((out / "moemerge.json").read_text())
    manifest["shard_digests"]["algorithm"] = "blake3"
    (out / "moemerge.json").write_text(json.dumps(manifest))
    assert_refused(run_cli("verify", out), "moemerge.json", "shard_digests.algorithm", "blake3")
