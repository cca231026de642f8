"""The protocol's clock: how many optimiser steps a run takes, where its evaluations fall, and
which windows each step trains on and each evaluation reads. One rule, computed once, for the
training loop, the length of a per-step schedule and what a run's summary records.

Steps are counted from 0 over the whole run. A pass is one sweep over the training windows, in
the shuffled order of (seed, pass). An epoch of the protocol is the training between two
evaluations: `eval_every` steps when set, else one pass; so with the defaults both are the
reference's epoch, and every reference run replays unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.data import Splits, batch_rows, num_batches, train_order

# The validation sample (`eval_windows`) is drawn with this seed, not the run's, so that every run
# on a corpus is judged on the same windows.
EVAL_SAMPLE_SEED = 0
# A pass's order is drawn once and read chunk by chunk: on a large corpus it is a permutation of
# millions of windows. Two: a chunk may straddle two passes.
_pass_order = functools.lru_cache(maxsize=2)(train_order)


@dataclasses.dataclass(frozen=True, eq=False)
class Clock:
    """One run's clock and its windows."""

    seed: int
    batch_size: int
    train_stride: int  # training windows start every train_stride tokens
    train_windows: int  # the training windows of a pass
    steps_per_pass: int  # every training window once, or --max-steps-per-epoch if fewer
    total_steps: int  # the budget
    eval_every: int  # steps between evaluations (the last may come sooner)
    val_indices: np.ndarray  # (N,) the validation windows each evaluation reads, in order

    @classmethod
    def of(cls, cfg: ExperimentConfig, splits: Splits, max_steps_per_epoch: int | None = None
           ) -> Clock:
        train_windows = -(-splits.num_train // cfg.train_stride)
        steps_per_pass = num_batches(train_windows, cfg.batch_size)
        if max_steps_per_epoch is not None:
            steps_per_pass = min(steps_per_pass, max_steps_per_epoch)
        total = cfg.max_steps or cfg.num_epochs * steps_per_pass
        return cls(cfg.seed, cfg.batch_size, cfg.train_stride, train_windows, steps_per_pass,
                   total, cfg.eval_every or steps_per_pass,
                   validation_sample(splits.num_val, cfg.eval_windows))

    @property
    def epochs(self) -> int:
        """Evaluations in the whole budget: the protocol's epochs."""
        return math.ceil(self.total_steps / self.eval_every)

    def epoch_span(self, epoch: int) -> tuple[int, int]:
        """The steps [first, end) of epoch `epoch` (1-based)."""
        first = (epoch - 1) * self.eval_every
        return first, min(first + self.eval_every, self.total_steps)

    def train_rows(self, first: int, end: int) -> dict[str, np.ndarray]:
        """Window starts and weights of steps [first, end), each (end - first, B); a pass's
        last batch is padded with weight-0 windows."""
        parts = []
        step = first
        while step < end:
            pass_number, row = divmod(step, self.steps_per_pass)
            rows = min(end - step, self.steps_per_pass - row)
            order = _pass_order(self.seed, pass_number + 1, self.train_windows)
            picked = order[row * self.batch_size:(row + rows) * self.batch_size]
            parts.append(_rows(picked * self.train_stride, self.batch_size, rows))
            step += rows
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    @property
    def val_batches(self) -> int:
        return num_batches(len(self.val_indices), self.batch_size)

    def val_rows(self, splits: Splits, first: int, end: int) -> dict[str, np.ndarray]:
        """Validation batches [first, end) of the evaluation's windows, each (end - first, B)."""
        picked = self.val_indices[first * self.batch_size:end * self.batch_size]
        return _rows(splits.validation_starts(picked), self.batch_size, end - first)


def validation_sample(num_val: int, windows: int) -> np.ndarray:
    """The validation windows an evaluation reads: all of them (`windows` 0, or as many as
    there are), else a fixed random sample of `windows`, in order."""
    if not windows or windows >= num_val:
        return np.arange(num_val)
    rng = np.random.default_rng(EVAL_SAMPLE_SEED)
    return np.sort(rng.choice(num_val, windows, replace=False))


def _rows(starts: np.ndarray, batch_size: int, rows: int) -> dict[str, np.ndarray]:
    """`starts` as the `rows` batches of `batch_size` that `batch_rows` makes of them."""
    batches = batch_rows(starts, batch_size)
    assert len(batches["starts"]) == rows, (len(batches["starts"]), rows)
    return batches
