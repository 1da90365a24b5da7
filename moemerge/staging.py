"""The output folder appears whole or not at all: we write into a hidden partial folder and rename it."""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moemerge.errors import MoemergeError

PARTIAL_TAG = "moemerge-partial"
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def check_output(out: Path, force: bool, sources: list[Path]) -> None:
    """Refuse before any work: an existing OUT without --force, an OUT inside a source, an unwritable parent."""
    resolved = out.resolve()
    if out.exists() and not force:
        raise MoemergeError(f"{out} already exists; choose another output folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MoemergeError(f"{out} exists and is a file; --force only replaces an output folder")
    for source in sources:
        src = source.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise MoemergeError(f"{out} is inside or around the source model {source}; write the output elsewhere")
    parent = _existing_parent(resolved)
    if not os.access(parent, os.W_OK):
        raise MoemergeError(f"{parent} is not writable; choose an output folder you can write to")


def _existing_parent(path: Path) -> Path:
    """The nearest folder above OUT that exists; a file in the way is refused now, not after the gates."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoemergeError(f"{parent} is a file, so {path} cannot be created under it; choose another output folder")
    return parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove partial folders for OUT left by merges that were killed (their process is gone)."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for leftover in out.parent.glob(f".{out.name}.{PARTIAL_TAG}-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a partial folder beside OUT; on success it replaces OUT, on any failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    partial = out.parent / f".{out.name}.{PARTIAL_TAG}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        if out.exists():
            if not force:
                raise MoemergeError(f"{out} appeared while merging; it was left as it is and nothing was written")
            _exchange(partial, out)
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _exchange(new: Path, old: Path) -> None:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE), so OUT is never missing in between;
    elsewhere fall back to two renames."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if (
        renameat2 is not None
        and renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(old), RENAME_EXCHANGE) == 0
    ):
        return
    aside = old.parent / f".{old.name}.moemerge-replaced-{os.getpid()}"
    old.rename(aside)
    new.rename(old)
    aside.rename(new)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
