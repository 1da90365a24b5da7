"""Interrupted and failing merges: OUT is absent or complete, never half-written; leftovers are cleaned."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_models import make_base, make_expert, write_recipe

from moemerge.verify import verify

CLI = str(Path(sys.executable).parent / "moemerge")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    base = make_base(root / "base", hidden_size=128, intermediate_size=256, num_hidden_layers=6)
    experts = [make_expert(base, root / f"e{i}", seed=i) for i in range(3)]
    return write_recipe(root / "r.yaml", base, experts)


def _start(recipe: Path, out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [CLI, str(recipe), str(out), "--shard-size", "100KB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.moemerge-partial-*"))


def _wait_for_partial(process: subprocess.Popen, out: Path, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if _partials(out):
            return True
        time.sleep(0.002)
    return False


def _assert_absent_or_complete(out: Path) -> None:
    if out.exists():
        verify(out, deep=True)


@pytest.mark.parametrize("delay", [None, 0.0, 0.05, 0.15, 0.4])
def test_sigkill_leaves_no_half_output(recipe, tmp_path, delay):
    """delay None: killed during hidden states (before any output); else that long into writing shards."""
    out = tmp_path / "out"
    process = _start(recipe, out)
    if delay is None:
        time.sleep(3.0)
        assert not _partials(out), "writing started before hidden states were done"
    else:
        assert _wait_for_partial(process, out), process.communicate()
        time.sleep(delay)
    process.kill()
    process.wait()
    _assert_absent_or_complete(out)
    leftovers = _partials(out)
    assert all(p.name.startswith(".out.moemerge-partial-") for p in leftovers)

    rerun = subprocess.run([CLI, str(recipe), str(out), "--force"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert not _partials(out), "the next run must clean leftovers of killed runs"
    verify(out, deep=True)


@pytest.mark.parametrize("delay", [0.0, 0.1])
def test_sigint_cleans_up(recipe, tmp_path, delay):
    out = tmp_path / "out"
    process = _start(recipe, out)
    assert _wait_for_partial(process, out)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if out.exists():  # the merge finished before the signal landed: then the output must be complete
        verify(out, deep=True)
        return
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists()
    assert not _partials(out)


def test_sigkill_with_existing_output_keeps_it(recipe, tmp_path):
    """--force replaces OUT only at the end: killed before, the old OUT is still there and whole."""
    out = tmp_path / "out"
    first = subprocess.run([CLI, str(recipe), str(out)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    (out / "marker").write_text("old")
    process = subprocess.Popen(
        [CLI, str(recipe), str(out), "--force", "--shard-size", "100KB"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert _wait_for_partial(process, out)
    process.kill()
    process.wait()
    assert out.exists(), "the old output must survive until the new one replaces it in one step"
    verify(out, deep=True)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_disk_full_gives_clear_error_and_no_output(recipe, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [CLI, str(recipe), str(out), "--shard-size", "1GB"], capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), run.stderr
    assert "File too large" in lines[0] and "model-00001-of-00001.safetensors" in lines[0]
    assert not out.exists()
    assert not _partials(out)
