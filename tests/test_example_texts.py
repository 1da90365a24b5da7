"""The built-in example's shipped texts keep the splits the shipped adapters were trained with."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
from support.paths import ROOT

TEXTS = ROOT / "examples" / "texts"
sys.path.insert(0, str(ROOT / "examples"))

from domains import domain_texts  # noqa: E402

SPLITS = ("train", "prompts", "heldout")


def rows(domain: str) -> list[dict]:
    return [json.loads(line) for line in (TEXTS / f"{domain}.jsonl").read_text(encoding="utf-8").splitlines()]


def split_key(domain: str, source: str) -> str:
    """What the split was hashed from when the adapters were trained: the module's file name, or the path."""
    return source.removeprefix("Lib/") if domain == "python" else source


@pytest.mark.parametrize("domain", ["python", "legal"])
def test_every_source_sits_in_the_split_its_name_hashes_to(domain):
    seen = set()
    for row in rows(domain):
        digest = hashlib.md5(split_key(domain, row["source"]).encode()).digest()
        assert row["split"] == SPLITS[digest[0] % 3], row["source"]
        assert row["source"] not in seen, row["source"]
        seen.add(row["source"])


@pytest.mark.parametrize("domain", ["python", "legal"])
def test_each_splits_chunks_come_from_that_splits_sources(domain):
    """(Not exclusively: licence boilerplate such as the MIT permission notice is in files of every split.)"""
    for split in SPLITS:
        texts = [r["text"] for r in rows(domain) if r["split"] == split]
        chunks = domain_texts(domain, split, 24, chars=600)
        assert len(chunks) == 24
        for chunk in chunks:
            assert any(chunk in text for text in texts), (split, chunk[:80])
