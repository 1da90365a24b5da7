"""The Python version the package asks for is the one its code needs and the README states: moemerge calls
hashlib.file_digest (Python 3.11), so an install on 3.10 must be refused by pip, not fail in `verify`."""

from __future__ import annotations

import re
import tomllib

from support.paths import ROOT

NEEDS = {"hashlib.file_digest": (3, 11)}  # the newest standard-library call the package makes, and since when


def _floor(text: str) -> tuple[int, int]:
    major, minor = re.search(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


def test_requires_python_covers_what_the_code_calls():
    source = "\n".join(path.read_text() for path in (ROOT / "moemerge").rglob("*.py"))
    needed = max(version for call, version in NEEDS.items() if call in source)
    stated = _floor(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert stated >= needed
    readme = re.search(r"with Python (\d+\.\d+)\+", (ROOT / "README.md").read_text())
    assert readme and _floor(readme.group(1)) == stated
