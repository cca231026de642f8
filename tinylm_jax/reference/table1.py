"""The reference report's numbers that this project is judged against: its per-epoch validation
perplexities, Table 1, and which of its experiments a run reproduces."""

from __future__ import annotations

from tinylm_jax.core.config import EXPERIMENT_NAMES, load_config

# The reference notebook's printed validation perplexity after each epoch (its figure 2's curves);
# Table 1 is each curve's minimum.
REFERENCE_VAL_PPL = {
    "baseline": (78.06, 67.09, 62.34, 60.94, 60.14, 60.00, 60.19),
    "medium": (79.47, 69.06, 64.60, 63.75, 63.24, 63.73),
    "wider": (87.97, 74.69, 67.99, 64.77, 62.19, 60.51, 59.65, 59.17, 58.56, 58.35, 58.37),
}
# The reference report's Table 1: best validation perplexity and the epoch it was reached.
REFERENCE_TABLE1 = {key: (min(curve), curve.index(min(curve)) + 1)
               for key, curve in REFERENCE_VAL_PPL.items()}
# Tokens of the reference's corpus in its 500-entry BPE: they fix the windows each of its epochs
# saw.
REFERENCE_NUM_TOKENS = 447_717


def reference_experiment(key: str, experiment: str) -> str | None:
    """Which of the reference's experiments (baseline, medium, wider) a run keyed `key` reproduces:
    the key itself if it is one, else the one whose config is named `experiment`; or None."""
    if key in REFERENCE_TABLE1:
        return key
    names = {load_config(name).name: name for name in EXPERIMENT_NAMES}
    return names.get(experiment)


def reference_result(key: str, experiment: str) -> tuple[float, int] | None:
    """The reference's (best PPL, epoch) for a run keyed `key`, as `reference_experiment` matches
    it."""
    ref = reference_experiment(key, experiment)
    return REFERENCE_TABLE1[ref] if ref else None
