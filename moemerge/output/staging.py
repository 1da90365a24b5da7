"""The output folder appears whole or not at all: we write into a hidden partial folder and rename it."""

from __future__ import annotations

import ctypes
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moemerge.errors import NO_ROOM, MoemergeError, OptionError
from moemerge.interrupt import interrupted, shielded

PARTIAL_TAG = "moemerge-partial"
AT_FDCWD = -100
RENAME_EXCHANGE = 2


def output_folder(out: Path) -> Path:
    """Where the output really goes: an OUT that is a symlink stands for the folder it points to, which is
    replaced (the link keeps pointing at the new output); the link itself is never swapped for a folder."""
    return out.resolve() if out.is_symlink() else out


def check_output(out: Path, force: bool, reads: list[tuple[str, Path]]) -> None:
    """Refuse before any work: an existing OUT without `force`, an unwritable parent, and an OUT equal to,
    inside or around anything the merge reads (`reads`: what it is, e.g. "the LoRA adapter", and its path),
    symlinks resolved, since `force` deletes what OUT holds and a merge writes where OUT is."""
    resolved = out.resolve()
    if out.exists() and not force:
        raise OptionError("{out} already exists; choose another output folder or pass {force} to replace it", out=out)
    if out.exists() and not out.is_dir():
        raise OptionError("{out} exists and is a file; {force} only replaces an output folder", out=out)
    for what, path in reads:
        read = path.resolve()
        if resolved == read or read in resolved.parents or resolved in read.parents:
            raise MoemergeError(
                f"{out} is inside or around {what} {path}, which the recipe reads; write the output elsewhere"
            )
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


def _lock(folder: Path) -> int | None:
    """An exclusive flock on `folder`, held while the returned descriptor is open; None when another process
    holds it, or where the filesystem has no such locks (then nothing is ever taken for a leftover). The kernel
    drops a lock when its holder dies, in whatever PID namespace (container) that runs, so a held lock means a
    live merge and a free one a leftover: a PID in the name cannot tell the two apart across containers."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove partial folders for OUT left by merges that were killed: those whose lock no process holds."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for leftover in out.parent.glob(f".{out.name}.{PARTIAL_TAG}-*"):
        if leftover.is_symlink() or not leftover.is_dir():
            continue  # not made by a merge
        try:
            fd = _lock(leftover)
        except OSError:
            continue  # another merge removed it first, or it is not ours to open
        if fd is None:
            continue  # a merge is writing into it
        try:
            _remove(leftover)
        finally:
            os.close(fd)
        removed.append(leftover)
    return removed


def _new_partial(out: Path) -> tuple[Path, int | None]:
    """A fresh partial folder beside OUT and its lock. Its name is unique (PID and random letters: merges in
    two containers may both run as PID 1), and it is made and locked under a name the cleanup does not look
    at, then renamed, so another merge's cleanup never finds it unlocked."""
    unique = f"{os.getpid()}-{secrets.token_hex(6)}"
    making = out.parent / f".{out.name}.moemerge-new-{unique}"
    making.mkdir()  # not mkdtemp: its 0700 would become the output's mode
    lock = _lock(making)
    partial = out.parent / f".{out.name}.{PARTIAL_TAG}-{unique}"
    making.rename(partial)
    return partial, lock


def _remove(path: Path) -> None:
    """Remove a leftover: a folder with its contents, or a link (never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _missing_parents(out: Path) -> list[Path]:
    """The folders above OUT that do not exist yet, deepest first: a failed merge removes what it created."""
    missing = []
    parent = out.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a partial folder beside OUT; on success it replaces OUT, on any failure it is removed, with
    the parent folders it had to create. A Ctrl-C that a library swallowed (in a __del__, say) still stops
    the merge just before OUT is put in place."""
    created = _missing_parents(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    partial, lock = _new_partial(out)
    try:
        yield partial
        _fsync_tree(partial)
        if interrupted():
            raise KeyboardInterrupt
        if out.exists():
            if not force:
                raise MoemergeError(f"{out} appeared while merging; it was left as it is and nothing was written")
            _exchange(partial, out)
            _remove(partial)  # now the old OUT
        else:
            partial.rename(out)
        _fsync(out.parent)  # the rename itself
    except BaseException as exc:
        with shielded():
            _remove(partial)
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break  # no longer empty: something else now lives there
        if isinstance(exc, OSError) and exc.errno in NO_ROOM:  # the OS names the source a copy came from
            raise MoemergeError(f"could not write {out}: {exc.strerror}; free disk space or write elsewhere") from None
        raise
    finally:
        if lock is not None:
            os.close(lock)


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
    aside = new.with_name(new.name.replace(PARTIAL_TAG, "moemerge-replaced", 1))
    old.rename(aside)
    new.rename(old)
    aside.rename(new)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder of the output to disk before the rename makes it OUT: after a power loss,
    OUT is then whole, not files that a later step rewrote in place (tune_on_moe's routers) or wrote last (the
    JSON records, the digests among them) still holding stale or no bytes under a name that says done. The
    shards were flushed as they were written, so this waits mostly for the small files."""
    for path in sorted(folder.rglob("*"), reverse=True):  # a folder's entries before the folder
        if not path.is_symlink():
            _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
