"""Stop signals (SIGINT, SIGTERM): one handler, which raises Interrupted where the process is, except inside a
`deferred()` block, where it is raised when the block ends: native code that calls back into Python loses or garbles
an exception raised inside it (ctypes discards one raised in llama.cpp's log callback), and training commits its step
first (train.callbacks.StopOnSignal asks `pending()`). A second signal inside a deferred block stops the process
at once.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal (exit 128 + signal number); a KeyboardInterrupt so that `except Exception` never swallows it
    while every `finally` on the way out runs."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


_received: list[int] = []  # every stop signal this process got
_deferring = 0  # depth of deferred() blocks
_pending: int | None = None  # a signal received while deferred, not yet raised or taken


def _handle(signum: int, frame: object) -> None:
    global _pending
    _received.append(signum)
    if not _deferring:
        raise Interrupted(signum)
    if _pending is not None:  # the second: no more waiting
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _pending = signum


def received() -> list[int]:
    """Every stop signal this process has received, oldest first (the CLI tells a stop from a bug by them)."""
    return list(_received)


@contextmanager
def handled() -> Iterator[None]:
    """Stop signals go to this module's handler for the block, then to the ones before it. Outside the main thread
    signals cannot be handled: the block runs with whatever handles them."""
    try:
        previous = {s: signal.signal(s, _handle) for s in STOP}
    except ValueError:
        previous = {}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


@contextmanager
def deferred() -> Iterator[None]:
    """A stop signal inside the block takes effect as it ends (Interrupted), unless taken (`take()`) meanwhile or
    an exception is already on its way out."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and pending() is not None:
        raise Interrupted(take() or signal.SIGINT)


def pending() -> int | None:
    """The signal received inside a deferred block and not yet acted on."""
    return _pending


def take() -> int | None:
    """The pending signal, now acted on by the caller (training stopped for it): no longer raised by deferred()."""
    global _pending
    signum, _pending = _pending, None
    return signum


def ignore() -> None:
    """Stop signals are ignored from now on (a process that only waits to exit with another process's status)."""
    for s in STOP:
        signal.signal(s, signal.SIG_IGN)
