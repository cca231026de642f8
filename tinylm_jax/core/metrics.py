"""The protocol's rules on a run's history: perplexity, the best epoch, and when to stop.

A history is a list of per-epoch rows (dicts with at least `epoch` and `val_ppl`), as training
writes them and every analysis reads them; both import these rules from here.
"""

from __future__ import annotations

import math
from typing import Any

from tinylm_jax.core.config import ExperimentConfig


def perplexity(loss: float) -> float:
    """exp(loss), infinite rather than an OverflowError for a diverging loss."""
    return math.exp(loss) if loss < 709.0 else math.inf


def best_epoch(history: list[dict[str, Any]]) -> int | None:
    """1-based epoch of the first strictly lowest finite validation perplexity."""
    best, best_ppl = None, math.inf
    for row in history:
        if math.isfinite(row["val_ppl"]) and row["val_ppl"] < best_ppl:
            best, best_ppl = row["epoch"], row["val_ppl"]
    return best


def latest_is_best(history: list[dict[str, Any]]) -> bool:
    """Whether the latest epoch set a new best: the log's "new best", and for a finished run, one
    that the epoch cap, not early stopping, ended while it was still improving."""
    return bool(history) and best_epoch(history) == history[-1]["epoch"]


def should_stop(history: list[dict[str, Any]], cfg: ExperimentConfig) -> bool:
    """The reference's rule: `early_stop_patience` epochs in a row without a new best PPL."""
    best = best_epoch(history)
    return bool(history) and best is not None and len(history) - best >= cfg.early_stop_patience
