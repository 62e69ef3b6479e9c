"""Stop requests: SIGINT and SIGTERM (a scheduler's preemption, Ctrl-C) set a flag; the run finishes its
step, every process agrees on it, saves a checkpoint and returns. A second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A flag set by SIGINT / SIGTERM while the block runs (handlers restored on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if signum == signal.SIGTERM:
            print(
                "\nxdpo train: SIGTERM received: saving a checkpoint after this step, then stopping",
                flush=True,
            )
        else:
            print("\nxdpo train: SIGINT: stopping after this step (Ctrl-C again to stop now)", flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)
