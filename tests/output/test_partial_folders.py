"""The hidden partial folder: two merges into one OUT never share it, even from two containers where both run
as the same PID, and a killed merge's leftover is removed by the next merge while a live one's is not."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from moemerge.output.staging import staged_output


def _held_partial(out: Path, suffix: str) -> tuple[Path, int]:
    """A partial folder of a merge that is still running elsewhere: it holds the folder's lock (flock locks
    taken through separate opens conflict even within one process, as between two containers)."""
    folder = out.parent / f".{out.name}.moemerge-partial-{suffix}"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"theirs")
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return folder, fd


@pytest.mark.parametrize("their_pid", ["same", "absent here"])
def test_a_running_merge_in_another_container_keeps_its_partial_folder(tmp_path, their_pid):
    """The other merge runs as our PID (both PID 1 in their containers) or as a PID that does not exist in ours."""
    out = tmp_path / "out"
    theirs, fd = _held_partial(out, str(os.getpid()) if their_pid == "same" else "999999999")
    try:
        with staged_output(out, force=False) as partial:
            assert partial != theirs
            (partial / "config.json").write_text("{}")
            assert (theirs / "model-00001-of-00002.safetensors").read_bytes() == b"theirs"
        assert (theirs / "model-00001-of-00002.safetensors").read_bytes() == b"theirs"
        assert [p.name for p in out.iterdir()] == ["config.json"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", ["12345-0123456789ab", "12345", str(os.getpid())])
def test_a_killed_merges_partial_folder_is_removed(tmp_path, name):
    """No process holds its lock (an older version's `-PID` names included, even our own PID): it goes."""
    out = tmp_path / "out"
    leftover = out.parent / f".{out.name}.moemerge-partial-{name}"
    leftover.mkdir()
    (leftover / "model-00001-of-00002.safetensors").write_bytes(b"half")
    with staged_output(out, force=False) as partial:
        (partial / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_named_like_a_partial_folder_is_not_removed(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / ".out.moemerge-partial-1"
    mine.write_text("not a merge's")
    with staged_output(out, force=False):
        pass
    assert mine.read_text() == "not a merge's"


def test_the_output_folder_has_the_usual_mode(tmp_path):
    """The partial folder becomes OUT: it is made as mkdir makes folders (umask applied), not private."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "out"
    with staged_output(out, force=False):
        pass
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_every_file_and_folder_is_flushed_before_the_rename(tmp_path, monkeypatch):
    """After a power loss OUT must not name files whose bytes never reached the disk: a file rewritten in place
    after it was written (tune_on_moe's routers), the JSON records. Each is fsynced before the rename."""
    out = tmp_path / "out"
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(self)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    with staged_output(out, force=False) as partial:
        (partial / "model-00001-of-00001.safetensors").write_bytes(b"routers rewritten in place")
        (partial / "sub").mkdir()
        (partial / "sub" / "moemerge.json").write_text("{}")
        events.clear()  # what the merge wrote is done; from here on, staging's work
    renamed = events.index(("rename", str(partial)))
    flushed = {path for kind, path in events[:renamed] if kind == "fsync"}
    want = {str(partial / name) for name in ("model-00001-of-00001.safetensors", "sub/moemerge.json", "sub", "")}
    assert {str(Path(p)) for p in want} <= flushed, events
