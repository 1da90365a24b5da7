"""The guard behind tests/conftest.py's `outputs_with_features_verify`: every output a test wrote with a feature off
its default (tune_on_moe, moe_layers, non_expert_weights, shared experts, generated gates) must pass what `moemerge
verify` runs (deep: structure, values, recorded shard digests, loading), so no feature can write what verify
rejects. Outputs are found by the manifest every merge writes, which records the recipe it was made from."""

from __future__ import annotations

import json
from pathlib import Path

from moemerge.errors import MoemergeError
from moemerge.files import MANIFEST
from moemerge.tools.verify import verify


def features(recipe: dict) -> list[str]:
    """The non-default features a recipe (as moemerge.json records it) uses."""
    found = []
    if (recipe.get("training") or {}).get("tune_on_moe"):
        found.append("tune_on_moe")
    if recipe.get("moe_layers") is not None:
        found.append("moe_layers")
    if recipe.get("non_expert_weights", "base") != "base":
        found.append(f"non_expert_weights {recipe['non_expert_weights']}")
    if recipe.get("shared_experts"):
        found.append("shared_experts")
    if recipe.get("gate_mode") == "generated":  # writes generated_texts.jsonl beside the shards
        found.append("gate_mode generated")
    return found


class OutputGuard:
    """Remembers the outputs already checked (by manifest path and write time) so each is verified once."""

    def __init__(self) -> None:
        self.seen: set[tuple[Path, int]] = set()

    def check_new(self, root: Path) -> list[str]:
        """Verify every output under `root` not seen before whose recipe uses a feature; returns the failures."""
        failures = []
        for manifest in sorted(root.rglob(MANIFEST)):
            out = manifest.parent
            if any(part.startswith(".") for part in out.relative_to(root).parts):
                continue  # a staging folder of an unfinished merge, not an output
            key = (manifest, manifest.stat().st_mtime_ns)
            if key in self.seen:
                continue
            self.seen.add(key)
            try:
                used = features(json.loads(manifest.read_text(encoding="utf-8")).get("recipe") or {})
            except (OSError, ValueError, AttributeError):
                continue  # a manifest a test damaged on purpose: not an output of a feature
            if not used:
                continue
            try:
                verify(out, deep=True)
            except MoemergeError as exc:
                failures.append(f"{out} (made with {', '.join(used)}): moemerge verify rejects it: {exc}")
        return failures
