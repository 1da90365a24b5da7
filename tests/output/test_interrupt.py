"""Ctrl-C at any moment: exit 130, one line, no traceback, OUT absent or complete, no partial folder left; SIGTERM
and SIGHUP the same, with exit 128 + their number.

The signals are sent at moments the test observes rather than after fixed sleeps: while torch is being
imported (its library appears in the process's memory map), while a shard is half written (the partial
shard has reached a known size), again during cleanup, and from inside a library's __del__, where
Python swallows the KeyboardInterrupt.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.hostile import run_cli, tree
from support.paths import CLI
from support.tiny_models import make_base, write_recipe

from moemerge import MergeOptions, interrupt, merge
from moemerge.output import records
from moemerge.output.staging import staged_output

pytestmark = pytest.mark.slow  # interrupts whole merges run by the CLI


SHARD = 10_000_000
WAIT = 120  # seconds: a bound on polling, not a timing assumption


@pytest.fixture(scope="module")
def big_recipe(tmp_path_factory) -> Path:
    """~100 MB of computed expert tensors (noise makes every one of them computed, not copied), in 10 MB shards."""
    root = tmp_path_factory.mktemp("interrupt")
    base = make_base(root / "base", hidden_size=256, intermediate_size=1024, num_hidden_layers=8)
    experts = [{"source_model": str(base), "name": f"e{i}", "noise_scale": 0.01} for i in range(4)]
    return write_recipe(root / "r.yaml", base, experts, gate_mode="random", experts_per_token=2)


def start(recipe: Path, out: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [CLI, str(recipe), str(out), "--shard-size", str(SHARD), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(process: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not ready():
        assert process.poll() is None, f"moemerge ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after {WAIT} s"
        time.sleep(0.001)


def first_shard_size(out: Path) -> int:
    for partial in out.parent.glob(f".{out.name}.moemerge-partial-*"):
        for shard in partial.glob("model-00001-of-*.safetensors"):
            return shard.stat().st_size
    return 0


LINES = {
    signal.SIGINT: "interrupted: an unfinished merge leaves no output folder",
    signal.SIGTERM: "stopped by SIGTERM: an unfinished merge leaves no output folder",
    signal.SIGHUP: "stopped by SIGHUP: an unfinished merge leaves no output folder",
}


def assert_interrupted(process: subprocess.Popen, out: Path, signum: int = signal.SIGINT, replaced: bool = False):
    stdout, stderr = process.communicate(timeout=WAIT)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 128 + signum, stderr  # as a shell reports a process the signal killed
    assert lines == [LINES[signum]], stderr
    assert "Traceback" not in stderr + stdout
    assert out.exists() == replaced
    assert list(out.parent.glob(f".{out.name}.moemerge-*")) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stopped_while_torch_is_imported(big_recipe, tmp_path, signum):
    out = tmp_path / "out"
    process = start(big_recipe, out)
    maps = Path(f"/proc/{process.pid}/maps")
    wait_for(process, lambda: "libtorch" in maps.read_text(), "torch import")
    process.send_signal(signum)
    assert_interrupted(process, out, signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stopped_in_the_middle_of_a_shard(big_recipe, tmp_path, signum):
    """Ctrl-C, and SIGTERM (kill, timeout, docker stop, Slurm) and SIGHUP as well: one line, no partial folder."""
    out = tmp_path / "out"
    process = start(big_recipe, out)
    wait_for(process, lambda: first_shard_size(out) >= SHARD // 2, "half-written first shard")
    process.send_signal(signum)
    assert_interrupted(process, out, signum)


def test_sigterm_with_force_keeps_the_old_output(big_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    process = start(big_recipe, out, "--force")
    wait_for(process, lambda: first_shard_size(out) >= SHARD // 2, "half-written first shard")
    process.send_signal(signal.SIGTERM)
    assert_interrupted(process, out, signal.SIGTERM, replaced=True)
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "old"


def test_second_ctrl_c_does_not_stop_the_cleanup(tmp_path, monkeypatch):
    """A Ctrl-C that lands while the partial folder is being removed: the removal still finishes."""
    out = tmp_path / "out"
    real_rmtree = shutil.rmtree

    def rmtree_hit_by_ctrl_c(path, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, in the middle of cleanup
        return real_rmtree(path, *args, **kwargs)

    with interrupt.handling_signals(), pytest.raises(KeyboardInterrupt), staged_output(out, force=False) as partial:
        (partial / "model-00001-of-00002.safetensors").write_bytes(b"half")
        monkeypatch.setattr(shutil, "rmtree", rmtree_hit_by_ctrl_c)
        raise KeyboardInterrupt  # the first Ctrl-C
    assert list(tmp_path.iterdir()) == []


class SwallowsCtrlC:
    """A dependency's object whose __del__ runs while Ctrl-C arrives: Python prints the KeyboardInterrupt as
    'Exception ignored' and carries on."""

    def __del__(self) -> None:
        signal.raise_signal(signal.SIGINT)


def test_ctrl_c_swallowed_by_a_del_still_stops_the_merge(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    recipe = write_recipe(tmp_path / "r.yaml", base, [base, base], gate_mode="random")
    real_card = records.model_card

    def card_then_ctrl_c(*args, **kwargs):  # late in writing: all shards are on disk by now
        SwallowsCtrlC()
        return real_card(*args, **kwargs)

    monkeypatch.setattr(records, "model_card", card_then_ctrl_c)  # the records are written last
    before = tree(tmp_path)
    result = run_cli(recipe, tmp_path / "out", "--device", "cpu")
    assert result.rc == 130, result.stderr
    assert result.lines() == ["interrupted: an unfinished merge leaves no output folder"], result.stderr
    assert tree(tmp_path) == before
    # The command leaves no state behind: a library merge in the same process afterwards is not stopped.
    monkeypatch.undo()
    merge(recipe, tmp_path / "later", MergeOptions(device="cpu"))
    assert (tmp_path / "later" / "config.json").is_file()


def test_a_library_import_leaves_sigint_alone():
    """Only the `moemerge` command takes over Ctrl-C; `import moemerge` in a program does not."""
    code = "import signal, moemerge; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert run.stdout.strip() == "True", run.stderr
