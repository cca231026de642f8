"""Stopping on request: SIGTERM or SIGINT asks a run to stop at the next chunk boundary.

The handler only records the signal; the training loop polls `requested()` between compiled
chunks, then checkpoints its exact position and exits. A second Ctrl-C interrupts at once, without
a new checkpoint. orbax's own preemption hook only fires under `jax.distributed`, so a single
process needs this; with several processes, a signal to any of them stops them all together.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT set a flag instead of killing the process."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signum

    def requested(self) -> bool:
        """Whether this process, or any process of the run, has received a stop signal."""
        asked = self.received is not None
        if jax.process_count() > 1:
            asked = bool(np.any(multihost_utils.process_allgather(np.array(asked))))
        return asked

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "another process's signal"
