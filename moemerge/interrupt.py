"""Ctrl-C at any moment: one line, exit 130, and OUT absent or complete.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be. Raised inside a
dependency's `__del__`, it is printed as "Exception ignored" and lost, and the merge would go on to finish.
So the first SIGINT is also remembered: the merge checks just before putting OUT in place, and such a lost
interrupt is not printed. Inside `shielded()` (removing a partial output) a SIGINT only sets the flag, so
cleanup is not itself interrupted half way.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

EXIT_CODE = 130
STOPPED = "interrupted: an unfinished merge leaves no output folder"
_state = {"interrupted": False, "shielded": 0}


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _state["interrupted"] = True
    if not _state["shielded"]:
        raise KeyboardInterrupt


def _before_main(signum: int, frame: FrameType | None) -> None:
    os.write(2, f"{STOPPED}\n".encode())
    os._exit(EXIT_CODE)  # nothing is written before main() runs, so there is nothing to clean up


def guard_startup() -> None:
    """When this process is the `moemerge` command (its console script is __main__), a Ctrl-C while torch
    and transformers load (about 1.5 s, before main() runs) exits at once with one line instead of an
    import traceback. Imported as a library, moemerge leaves SIGINT alone."""
    main = sys.modules.get("__main__")
    if Path(getattr(main, "__file__", None) or "").name == "moemerge":
        signal.signal(signal.SIGINT, _before_main)


@contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that must run to the end: a SIGINT inside only sets the flag."""
    _state["shielded"] += 1
    try:
        yield
    finally:
        _state["shielded"] -= 1


def _unraisable(hook: Any) -> Any:
    def report(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return  # remembered in _state; the merge stops before OUT is put in place
        hook(unraisable)

    return report


@contextmanager
def handling_sigint() -> Iterator[None]:
    """Route SIGINT through the flag above while the command runs (enter it first thing, before the heavy
    work); on leaving, the previous handler and hook are back and the flag is cleared, so a later library
    call in the same process is not stopped by an old Ctrl-C."""
    previous = signal.getsignal(signal.SIGINT), sys.unraisablehook
    _state["interrupted"] = False
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable(previous[1])
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous[0])
        sys.unraisablehook = previous[1]
        _state["interrupted"] = False


def interrupted() -> bool:
    """Whether a SIGINT arrived inside handling_sigint(), whether or not its KeyboardInterrupt was caught somewhere."""
    return _state["interrupted"]
