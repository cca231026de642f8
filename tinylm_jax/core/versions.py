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


CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(key: str) -> str | None:
    """The first processor's `key` in Linux's /proc/cpuinfo ("model name", "flags"), or None
    where there is no such file or field."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def cpu_name() -> str:
    """The CPU's model name and its cores, e.g. "Intel(R) Xeon(R) Processor (2 cores)": on a CPU
    jax's device_kind says only "cpu", and timings mean little without the chip."""
    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    return f"{cpu} ({os.cpu_count()} cores)"
