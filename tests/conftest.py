"""Fixtures shared by test folders; the helpers they use live in tests/support (importable as `support`
through pytest's pythonpath setting in pyproject.toml)."""

from pathlib import Path

import pytest
from support.hostile import copy_sources, make_sources
from support.verified import OutputGuard


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


_GUARD = OutputGuard()


@pytest.fixture(scope="module", autouse=True)
def outputs_with_features_verify(tmp_path_factory):
    """After each test module (a scan per test would cost the suite minutes): every output its tests wrote with
    a non-default feature passes `moemerge verify` (support/verified)."""
    yield
    failures = _GUARD.check_new(tmp_path_factory.getbasetemp())
    assert not failures, "\n".join(failures)
