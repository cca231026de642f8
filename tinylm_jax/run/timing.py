"""Wall-clock timing of a compiled call, for the benchmarks and for `--products auto`."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(run: Callable[[], object], steps: int, repeats: int) -> list[float]:
    """Seconds per step of `run()` (which does `steps` steps and waits), after one warm-up."""
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) / steps)
    return times
