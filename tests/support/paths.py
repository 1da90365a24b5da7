"""Where things are: the repository root and the `moemerge` console script the tests run."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "moemerge")  # the console script of the venv running the tests
