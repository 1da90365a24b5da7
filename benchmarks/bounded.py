"""Run a command to a deadline, and at the deadline stop all of it: gpu_check.py's steps start merges and
servers that start processes of their own (merge_speed.py's merges, vLLM's engine), which a plain
subprocess timeout would leave running after killing only the first."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def run_bounded(command: list[str], log: Path, timeout: float | None) -> None:
    """Run `command` (output to `log`) in its own process group; kill the group and raise TimeoutExpired at
    `timeout` seconds (None: no limit), CalledProcessError on a non-zero exit."""
    with log.open("w") as sink:
        child = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
    if code:
        raise subprocess.CalledProcessError(code, command, output=log.read_text(errors="replace")[-2000:])
