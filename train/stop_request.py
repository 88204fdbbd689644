"""SIGUSR1 / SIGTERM handling: a signal only sets a flag; the training loop finishes its step,
agrees with the other ranks, saves a checkpoint and exits with EXIT_STOPPED."""

from __future__ import annotations

import signal
import threading
from typing import Optional

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped after saving a checkpoint; the caller may requeue and resume
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records that a stop signal arrived; use as a context manager to install the handlers."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None  # set once SIGUSR1 or SIGTERM has been received
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        # Only set a flag: checkpointing from inside a signal handler could interrupt a collective
        # or a half-written file.
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        # Handlers can only be installed from the main thread (e.g. not inside some notebook runners).
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
