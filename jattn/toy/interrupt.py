"""Ctrl-C (SIGINT) and SIGTERM in the trainer: recorded when they arrive, acted on between steps.

A ``KeyboardInterrupt`` raised wherever the signal happens to land can be lost: raised inside a
finalizer or an event-loop callback (orbax runs asyncio loops) it is printed and swallowed, and
the run trains on. So the handler only records the signal, and the training loop checks it after
every step and stops with ``Interrupted`` (exit status 128 + the signal's number: 130 for
Ctrl-C). A second signal exits at once. Checkpoint writes hold signals until they finish
(``checkpoint._signals_deferred``), so neither way leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from jattn.toy.errors import TrainerError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(TrainerError):
    """The run stopped on a signal; its newest checkpoint is where a rerun resumes."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Install the recording handlers for a ``with`` block (main thread only; else a no-op).

    ``check(step, workdir)`` raises ``Interrupted`` once a signal has arrived.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            print(f"train_toy.py: second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def check(self, step: int, workdir: str) -> None:
        """Raise ``Interrupted`` if a signal arrived (``step``: optimizer steps taken so far)."""
        if self.received is not None:
            name = signal.Signals(self.received).name
            raise Interrupted(self.received, f"interrupted by {name} after step {step}; run again with "
                              f"--workdir={workdir} to resume from its newest checkpoint")
