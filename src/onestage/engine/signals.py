"""Graceful termination on SIGTERM / SIGINT.

Two modes, both context managers that install handlers and restore the previous ones on exit:

- ``handle_termination()`` wraps the whole training run. The first SIGTERM/SIGINT only sets a
  flag; the training loop polls ``termination_requested()`` at step boundaries, writes its
  ``last`` checkpoint and stops cleanly (a cluster scheduler's SIGTERM gives some seconds of
  grace). A second signal raises ``TerminationRequested`` at once: the user insists.
- ``raise_on_termination()`` wraps evaluation. Evaluation can take minutes and has no step
  boundary to poll, so a signal raises ``TerminationRequested`` immediately; the exception
  unwinds through ``ModelEMA.swap_into``, whose ``finally`` puts the training weights back
  before the trainer saves them (seed 002: "If a SIGTERM arrives during evaluation, the
  finally block guarantees that weights are always restored").

Python runs signal handlers only in the main thread, and ``signal.signal`` refuses to be
called from any other thread, so both context managers are no-ops outside the main thread
(a trainer run from a worker thread, e.g. inside a notebook server, then simply cannot be
interrupted gracefully).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

# The signals a scheduler (SIGTERM: Slurm, Kubernetes, systemd) or a user (SIGINT: Ctrl-C) sends.
_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)

# Process-wide because a signal is process-wide; only the main thread writes it (handlers run there).
_requested: list[int] = []  # signal numbers received since handle_termination() was entered


class TerminationRequested(BaseException):
    """Raised when a termination signal must interrupt the current work immediately.

    A ``BaseException``, like ``KeyboardInterrupt``, so that error handlers written for
    ordinary failures (``except Exception`` in a data reader's skip-bad-images path, in a
    third-party library) cannot swallow it; ``except TerminationRequested`` catches it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}: stopping")
        self.signum = signum


def termination_requested() -> bool:
    """True once SIGTERM/SIGINT was received inside ``handle_termination()``."""
    return bool(_requested)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _installed(handler: Any) -> Iterator[None]:
    """Install ``handler`` for SIGTERM and SIGINT; always restore the previous handlers."""
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    try:
        for sig in _SIGNALS:
            signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            # getsignal() returns None for a handler installed from C; SIG_DFL is the closest.
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


def _flag_then_raise(signum: int, frame: FrameType | None) -> None:
    if _requested:
        raise TerminationRequested(signum)
    _requested.append(signum)


def _raise_now(signum: int, frame: FrameType | None) -> None:
    _requested.append(signum)
    raise TerminationRequested(signum)


@contextmanager
def handle_termination() -> Iterator[None]:
    """Around a training run: the first signal sets the flag, a second one raises.

    The flag lives only inside the block (cleared on entry and on exit), so a later run or
    evaluation in the same process starts clean; the trainer reports the stop itself.
    """
    if not _in_main_thread():
        yield
        return
    _requested.clear()
    try:
        with _installed(_flag_then_raise):
            yield
    finally:
        _requested.clear()


@contextmanager
def raise_on_termination() -> Iterator[None]:
    """Around evaluation: a signal raises ``TerminationRequested`` immediately.

    If a termination was already requested before entering, it raises at once instead of
    starting an evaluation that would be thrown away. Works nested inside
    ``handle_termination()`` (whose handlers come back on exit) or on its own.
    """
    if not _in_main_thread():
        yield
        return
    if _requested:
        raise TerminationRequested(_requested[0])
    with _installed(_raise_now):
        yield
