"""One rule for the shard names a weight index may give, whoever reads the index (a local folder, a Hub
download, verify): a plain file name inside the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moemerge.errors import MoemergeError
from moemerge.inputs.weight_index import read_weight_index

ESCAPING = ["../x", "/etc/x", "a/b", "a\\b", "..", ".", "", "x/", "./x"]
PLAIN = ["model.safetensors", "model-00001-of-00002.safetensors", "weights with spaces.safetensors", "..x", "x.."]


def index_file(folder: Path, shards: list[str]) -> Path:
    path = folder / "model.safetensors.index.json"
    weight_map = {f"model.layers.{i}.mlp.up_proj.weight": shard for i, shard in enumerate(shards)}
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.mark.parametrize("name", ESCAPING)
def test_a_shard_name_that_leaves_the_folder_is_refused(tmp_path, name):
    path = index_file(tmp_path, ["model-00001.safetensors", name])
    with pytest.raises(MoemergeError, match=f"{path}: shard name .* points outside the model folder; refused"):
        read_weight_index(path)


@pytest.mark.parametrize("name", PLAIN)
def test_a_plain_file_name_is_a_shard(tmp_path, name):
    index = read_weight_index(index_file(tmp_path, [name, name, "z.safetensors"]))
    assert index.shards == sorted({name, "z.safetensors"})
    assert set(index.weight_map.values()) == {name, "z.safetensors"}


def test_errors_name_the_caller_s_place(tmp_path):
    path = index_file(tmp_path, ["../x"])
    with pytest.raises(MoemergeError, match=r"^expert: org/coder's index: shard name '\.\./x' points outside"):
        read_weight_index(path, "expert: org/coder's index")


def test_a_weight_map_that_is_not_a_mapping_of_names_is_refused(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(MoemergeError, match="weight_map"):
        read_weight_index(path)
