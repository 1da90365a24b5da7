"""Shared fixtures; tests import their helpers (tiny_models, hostile) from this folder."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hostile import copy_sources, make_sources  # noqa: E402


@pytest.fixture(scope="module")
def masters(tmp_path_factory) -> Path:
    """Tiny sources made once per module (a module may define its own)."""
    return make_sources(tmp_path_factory.mktemp("masters"))


@pytest.fixture
def work(masters, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the sources to attack, as the working directory."""
    copy_sources(masters, tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
