"""How long-running steps report progress: the CLI shows rich bars, the Python API stays quiet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def task(self, description: str, total: int) -> Callable[[int], None]:
        """Start a step of `total` units; the returned function advances it by n units."""
        ...


class Silent:
    """No output: the default for `moemerge.merge()` called from Python."""

    def task(self, description: str, total: int) -> Callable[[int], None]:
        return lambda n: None
