"""Stopping a training cleanly on Ctrl-C (SIGINT) and SIGTERM (schedulers, ``docker stop``, ``timeout``)."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGuard:
    """Turns the first SIGINT or SIGTERM into a flag (``requested``: the signal's name, '' until then)
    that the training checks between steps, so a step is never cut in half; a second signal raises
    KeyboardInterrupt at once. ``emit("interrupt_requested", signal=name)`` tells the user. Installs
    itself only in the main thread (Python delivers signals there) and restores the old handlers on exit."""

    def __init__(self, emit):
        self.requested = ""
        self.emit = emit
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self.emit("interrupt_requested", signal=self.requested)

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False


def interrupt_after(steps: int):
    """A ``progress`` callback for ``train`` that raises KeyboardInterrupt, as Ctrl-C would, at the
    ``steps``-th batch event (the step after which the run stops): how the resume checks (the tests,
    benchmarks/gpu_train_check.py) stop a run in the middle of an epoch."""
    seen = 0

    def progress(event, **info):
        nonlocal seen
        if event == "batch":
            seen += 1
            if seen == steps:
                raise KeyboardInterrupt

    return progress
