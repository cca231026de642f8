"""The installed versions and the CPU a run's numbers depend on: recorded in run summaries and
benchmarks."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

RUN_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tokenizers", "numpy")


def package_versions(*extra: str) -> dict[str, str]:
    """Installed versions of `RUN_PACKAGES` and of `extra` ones."""
    return {name: importlib.metadata.version(name) for name in (*RUN_PACKAGES, *extra)}


def cpu_name() -> str:
    """The CPU's model name and its cores, e.g. "Intel(R) Xeon(R) Processor (2 cores)": on a CPU
    jax's device_kind says only "cpu", and timings mean little without the chip."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu} ({os.cpu_count()} cores)"
