"""A model folder's weight index (model.safetensors.index.json): which shard holds each tensor.

Read here and only here, so the rule for a shard name is written once for a local folder, a Hub download
and `verify` alike: an index is data from the internet, and a shard must be a plain file name inside the
folder (`../x`, `/etc/x`, `a/b` and `a\\b` would read, or fetch, a file from elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moemerge.errors import MoemergeError
from moemerge.files import read_json
from moemerge.inputs.model_files import ShardIndex, typed


def plain_file_name(name: object) -> bool:
    """A name that stays inside its folder: no separator of any platform, not empty, not `.` or `..`."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


@dataclass(frozen=True)
class WeightIndex:
    """The index's weight map (tensor name → shard) and its shards, sorted and distinct."""

    weight_map: dict[str, str]
    shards: list[str]


def read_weight_index(path: Path, where: str | Path | None = None) -> WeightIndex:
    """The index at `path`, typed and with every shard name checked; errors name `where` (default `path`)."""
    where = where or path
    weight_map = typed(ShardIndex, read_json(path), where).weight_map
    shards = sorted(set(weight_map.values()))
    escaping = [name for name in shards if not plain_file_name(name)]
    if escaping:
        raise MoemergeError(f"{where}: shard name {escaping[0]!r} points outside the model folder; refused")
    return WeightIndex(weight_map, shards)
