"""Shard digests: one hash per shard, recorded in moemerge.json as the shard is written and checked by
`moemerge verify`. They guard against flipped bits and truncated copies, not against an attacker (the Hub's
LFS sha256 covers uploads), so new outputs use xxh3-128, ~17x faster than sha256 (22 vs 1.3 GB/s on one
core), which hides behind the writing; the manifest names the algorithm, and outputs recorded with sha256
still verify."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import xxhash

from moemerge.errors import MoemergeError

WRITTEN = "xxh3_128"  # the algorithm new outputs record
KEY = "shard_digests"  # the manifest's key: {"algorithm": ..., "shards": {shard: hex digest}}
OLD_KEY = "shard_sha256"  # what moemerge wrote before: {shard: sha256}
ALGORITHMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher(start: bytes = b"") -> Hasher:
    """A running digest in the algorithm new outputs record."""
    hasher = ALGORITHMS[WRITTEN]()
    hasher.update(start)
    return hasher


def file_digest(path: Path, algorithm: str = WRITTEN) -> str:
    """The file's digest, read in chunks."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, ALGORITHMS[algorithm]).hexdigest()


def manifest_entry(digests: dict[str, str]) -> dict[str, object]:
    return {KEY: {"algorithm": WRITTEN, "shards": digests}}


def recorded_digests(manifest: dict[str, Any], where: str) -> tuple[str, dict[str, str]] | None:
    """(algorithm, shard → digest) as the manifest records them, in either layout; None when it records none
    (an output written by an older moemerge)."""
    if OLD_KEY in manifest:
        return "sha256", manifest[OLD_KEY]
    entry = manifest.get(KEY)
    if entry is None:
        return None
    algorithm = entry.get("algorithm") if isinstance(entry, dict) else None
    if algorithm not in ALGORITHMS:
        raise MoemergeError(
            f"{where}: {KEY}.algorithm is {algorithm!r}, not one of {', '.join(ALGORITHMS)}; "
            "verify it with the moemerge that wrote it"
        )
    return algorithm, entry.get("shards")
