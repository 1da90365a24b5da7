"""Hub ids as a recipe or `moemerge push` writes them (`org/name[@revision]`), and the Hub names of sources,
for the model card: shared by downloading and pushing, so neither imports the other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# Hub rules: `namespace/name`, letters, digits, `-`, `_`, `.`; no `--` or `..`; no leading/trailing `-`/`.`.
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"({_PART})/({_PART})")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """'org/name' or 'org/name@revision' → (repo id, revision or None); anything else → None."""
    repo_id, at, revision = text.strip().partition("@")
    if not HUB_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        return None
    if at and (not revision or any(c.isspace() for c in revision)):
        return None
    return repo_id, (revision or None) if at else None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def origin_of_cache_path(path: Path) -> str | None:
    """A folder inside the Hub cache (…/models--org--name/snapshots/<sha>) → 'org/name'."""
    for part in reversed(path.resolve().parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def origin_name(entry: dict[str, Any]) -> str | None:
    """A source as the Hub names it, for a model card's base_model: its id, or the id of a cached folder."""
    if "id" in entry:
        return entry["id"]
    if "path" in entry:
        return origin_of_cache_path(Path(entry["path"])) or Path(entry["path"]).name
    return None
