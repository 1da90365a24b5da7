"""Ctrl-C at any moment: one line, exit 130, and OUT absent or complete. SIGTERM (kill, timeout, docker stop,
Slurm) and SIGHUP (a closed terminal) do the same, with exit 128 + the signal's number.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be. Raised inside a
dependency's `__del__`, it is printed as "Exception ignored" and lost, and the merge would go on to finish.
So the first SIGINT is also remembered: the merge checks just before putting OUT in place, and such a lost
interrupt is not printed. Inside `shielded()` (removing a partial output) a SIGINT only sets the flag, so
cleanup is not itself interrupted half way. SIGTERM and SIGHUP raise `Stopped`, a KeyboardInterrupt, so every
cleanup that a Ctrl-C runs runs for them too; code that takes a Ctrl-C as "stop this answer" (chat) lets a
`Stopped` through.
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

EXIT_CODE = 130  # what typer makes of a KeyboardInterrupt
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_state: dict[str, Any] = {"signal": None, "shielded": 0}


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop the command, as a Ctrl-C stops a merge."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _state["signal"] is None:
        _state["signal"] = signum  # the first signal decides the exit status
    if not _state["shielded"]:
        raise KeyboardInterrupt if signum == signal.SIGINT else Stopped


def stopped_line(signum: int | None = None) -> str:
    """The one line a stopped command prints."""
    signum = signum or _state["signal"] or signal.SIGINT
    cause = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return f"{cause}: an unfinished merge leaves no output folder"


def exit_code() -> int:
    """128 + the number of the signal that stopped the command, as a shell reports a process killed by it."""
    return 128 + (_state["signal"] or signal.SIGINT)


def _before_main(signum: int, frame: FrameType | None) -> None:
    os.write(2, f"{stopped_line(signum)}\n".encode())
    os._exit(128 + signum)  # nothing is written before main() runs, so there is nothing to clean up


def guard_startup() -> None:
    """When this process is the `moemerge` command (its console script is __main__), a Ctrl-C (or SIGTERM,
    SIGHUP) while torch and transformers load (about 1.5 s, before main() runs) exits at once with one line
    instead of an import traceback. Imported as a library, moemerge leaves the signals alone."""
    main = sys.modules.get("__main__")
    if Path(getattr(main, "__file__", None) or "").name == "moemerge":
        for signum in STOP_SIGNALS:
            signal.signal(signum, _before_main)


@contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that must run to the end: a stop signal inside only sets the flag."""
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
def handling_signals() -> Iterator[None]:
    """Route SIGINT, SIGTERM and SIGHUP through the flag above while the command runs (enter it first thing,
    before the heavy work); on leaving, the previous handlers and hook are back and the flag is cleared, so a
    later library call in the same process is not stopped by an old signal."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    hook = sys.unraisablehook
    _state["signal"] = None
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    sys.unraisablehook = _unraisable(hook)
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        sys.unraisablehook = hook
        _state["signal"] = None


def interrupted() -> bool:
    """Whether a stop signal arrived inside handling_signals(), whether or not its KeyboardInterrupt was caught
    somewhere."""
    return _state["signal"] is not None
