"""The installed versions a run's numbers depend on: recorded in run summaries and benchmarks."""

from __future__ import annotations

import importlib.metadata

RUN_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tokenizers", "numpy")


def package_versions(*extra: str) -> dict[str, str]:
    """Installed versions of `RUN_PACKAGES` and of `extra` ones."""
    return {name: importlib.metadata.version(name) for name in (*RUN_PACKAGES, *extra)}
