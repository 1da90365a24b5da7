"""The gate pass on a thread of its own, so that the shards are written while it runs.

Only the routers need the gates, and the plan writes them last (moemerge.output.plan), so a merge with
hidden or trained gates takes about the longer of the gate pass and the writing instead of their sum: torch
and the file copies release the GIL, so both really run at once. The pass checks for cancellation at every
batch of prompts, so a merge that fails or is interrupted while writing stops it there and waits for it:
nothing is left running behind the merge, nor waiting for the gates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager, suppress
from functools import partial

from moemerge.gates.modes.mode import GateResult
from moemerge.interrupt import shielded
from moemerge.progress import Progress


class GatePassCancelled(Exception):
    """Raised inside the gate thread at its next batch once the merge it serves has stopped."""


class _Cancellable:
    """A progress that raises GatePassCancelled from any step's advance once `stop` is set."""

    def __init__(self, progress: Progress, stop: threading.Event) -> None:
        self.progress, self.stop = progress, stop

    def task(self, description: str, total: int) -> Callable[[int], None]:
        advance = self.progress.task(description, total)

        def checked(units: int) -> None:
            if self.stop.is_set():
                raise GatePassCancelled
            advance(units)

        return checked


@contextmanager
def gates_in_background(compute: Callable[[Progress], GateResult], progress: Progress) -> Iterator[Future[GateResult]]:
    """Start `compute(progress)` on a thread of its own; its result (or error) arrives in the future. Leaving the
    block cancels a pass still running."""
    stop, ended = threading.Event(), threading.Event()
    future: Future[GateResult] = Future()

    def settle(outcome: Callable[[], None]) -> None:
        with suppress(InvalidStateError):  # the merge stopped first and has settled it as cancelled
            outcome()

    def run() -> None:
        try:
            result = compute(_Cancellable(progress, stop))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the gates
            settle(partial(future.set_exception, exc))
        else:
            settle(partial(future.set_result, result))
        finally:
            ended.set()

    future.set_running_or_notify_cancel()
    thread = threading.Thread(target=run, name="moemerge-gates")
    thread.start()
    try:
        yield future
    finally:
        stop.set()
        # Whoever still waits for the gates (a writer thread at the routers) is let go at once.
        settle(partial(future.set_exception, GatePassCancelled()))
        # The pass itself ends at its next batch; it is waited for, because a thread still inside torch when
        # the interpreter exits aborts the process ("terminate called without an active exception"). A second
        # Ctrl-C must not cut the wait short: an interrupted join also marks the thread stopped, so the
        # interpreter would not wait for it at exit either. The CLI shields the wait; a Python caller's
        # default handler raises KeyboardInterrupt in it, which is held until the pass has ended.
        with shielded():
            try:
                _wait_through_interrupts(ended)
            finally:
                thread.join()  # also after a held KeyboardInterrupt: `ended` is set before the thread has ended


def _wait_through_interrupts(event: threading.Event) -> None:
    """Wait until `event` is set, even across KeyboardInterrupts, and raise one afterwards if any came."""
    interrupted = False
    while not event.is_set():
        try:
            event.wait()
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt
