"""orbax checkpoints of a run: the latest and the best (the protocol's best epoch,
`metrics.best_epoch`) are both kept.

Checkpoints are numbered 1, 2, 3, ... in the order they are saved: one at the end of every epoch,
ranked, and one wherever a run is stopped (a signal, `--stop-at-step`), unranked. An epoch's
checkpoint ranks by the epoch's number if it set a new best (`metrics.latest_is_best`) and 0 if
not, so the highest rank is the best epoch's.
Each holds the train state's arrays (`TrainState.arrays`: params, optimiser and plateau state,
the weights' average if any, step) and a JSON record
of the run so far: its history and, for a stop mid-epoch, the epoch's progress.

Safety, on top of orbax's own write-to-temporary-then-rename:
- the record carries sha256 checksums of the arrays and of itself, checked on every restore,
  because orbax restores flipped bytes silently;
- a state with a non-finite value is never saved;
- a full disk is reported in one line, and the previous checkpoint stays as it was (the
  tracebacks that orbax's writer threads, asyncio and tensorstore print about it are held back:
  `_QuietWhenDiskFull`);
- temporary folders left by a save that never finished are removed when a run opens the folder.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy
from tokenizers import Tokenizer

from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.files import disk_full
from tinylm_jax.core.metrics import latest_is_best
from tinylm_jax.core.model import TinyTransformerLM, build_model
from tinylm_jax.core.parallel import barrier, is_primary
from tinylm_jax.core.train import TrainingDiverged, TrainState, compute_dtype, create_train_state
from tinylm_jax.core.weights import read_weights
from tinylm_jax.run.folder import RunFolder


class CorruptCheckpoint(UserError):
    """A checkpoint whose files cannot be read or do not match their checksums."""


class DiskFull(UserError):
    """The disk filled up during a save; the checkpoints saved before are untouched."""


def _rank(metrics: dict[str, float]) -> float:
    """An epoch checkpoint's rank: the epoch if it set a new best, else 0 (module docstring).
    A checkpoint saved before this rank existed carries its validation loss: it ranks by that,
    between 0 and 1, so below any new best saved since."""
    if "new_best_epoch" in metrics:
        return metrics["new_best_epoch"]
    loss = metrics["val_loss"]
    return 1.0 / (1.0 + loss) if math.isfinite(loss) else 0.0


def _host_leaves(arrays: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Every array as (path, numpy copy). The state is replicated, so one copy is all of it."""
    leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
    return [(jax.tree_util.keystr(path),
             np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf))
            for path, leaf in leaves]


def _arrays_sha256(leaves: list[tuple[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for path, value in leaves:
        digest.update(f"{path}:{value.dtype}:{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _record_sha256(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _unranked_by_design(unranked: bool) -> Iterator[None]:
    """Around a save without metrics (a stop's, or one every so many steps), orbax's warning
    "Requested `tracked_metric`; did not provide metrics." is dropped: such a checkpoint is
    unranked by design, and lives only as long as it is the latest."""
    def filter_(record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()

    if unranked:
        logging.getLogger("absl").addFilter(filter_)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(filter_)


class _QuietWhenDiskFull(logging.Filter):
    """Around one save: what orbax's machinery prints about a full disk is held back, and dropped
    if the save ends in `DiskFull` (whose one line says it all); else it is shown as it would have
    been. Held back, as seen with orbax 0.12 on a full tmpfs:
    - the logger `absl`: each of orbax's writer threads (`_SignalingThread.run`) logs the
      RESOURCE_EXHAUSTED error with its traceback (30-40 lines each);
    - the logger `asyncio`: "Task exception was never retrieved" for the writes abandoned with the
      thread's event loop, when they are collected;
    - `sys.unraisablehook`: tensorstore's writes still in flight complete onto that closed loop,
      each a "RuntimeError: Event loop is closed" traceback (none to 80 of them).
    Anything else passes at once. Set `disk_full` before leaving when the save hit a full disk."""

    LOGGERS = ("absl", "asyncio")
    LOOP_CLOSED = "Event loop is closed"
    SETTLE_S, SETTLE_MAX_S = 0.2, 2.0  # the loop-closed ones come in one burst of a few ms

    def __init__(self):
        super().__init__()
        self.disk_full = False
        self.previous_hook = sys.unraisablehook
        self.records: list[logging.LogRecord] = []
        self.unraisables: list[Any] = []
        self.last_held = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and disk_full(record.exc_info[1]):
            self.records.append(record)
            self.last_held = time.monotonic()
            return False
        return True

    def _unraisable(self, unraisable: Any) -> None:
        if (unraisable.object is None and unraisable.exc_type is RuntimeError
                and str(unraisable.exc_value) == self.LOOP_CLOSED):
            self.unraisables.append(unraisable)
            self.last_held = time.monotonic()
        else:
            self.previous_hook(unraisable)

    def __enter__(self) -> _QuietWhenDiskFull:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *_: object) -> None:
        if self.disk_full:  # let the abandoned writes finish and be collected while held back
            start = time.monotonic()
            give_up = start + self.SETTLE_MAX_S
            while True:
                self.records.clear()  # their tracebacks would keep the abandoned writes alive
                self.unraisables.clear()
                gc.collect()
                now = time.monotonic()
                if now - max(start, self.last_held) >= self.SETTLE_S or now >= give_up:
                    break
                time.sleep(0.05)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self.previous_hook
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)
        if not self.disk_full:
            for record in self.records:
                logging.getLogger(record.name).handle(record)
            for unraisable in self.unraisables:
                self.previous_hook(unraisable)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


class RunCheckpoints:
    """The checkpoints folder of one run folder."""

    def __init__(self, run: RunFolder, read_only: bool = False):
        self.run_dir = run.path.resolve()
        self.folder = run.checkpoints.resolve()
        self.corrupt_folder = run.corrupt_checkpoints.resolve()
        if not read_only and is_primary():
            for leftover in self.folder.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(leftover)  # a save that never committed
        barrier("checkpoints-tidy")
        options = ocp.CheckpointManagerOptions(
            best_fn=_rank,
            best_mode="max",
            # max_to_keep with best_fn can evict the latest; this keeps both explicitly. A stop's
            # checkpoint has no metrics and lives only as long as it is the latest.
            preservation_policy=policy.AnyPreservationPolicy([
                policy.LatestN(n=1),
                policy.BestN(get_metric_fn=_rank, reverse=False, n=1,
                             keep_checkpoints_without_metrics=False),
            ]),
            enable_async_checkpointing=False,
            # Reading touches nothing. (orbax's own read_only flag warns on every use.)
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.folder, options=options)

    def save(self, state: TrainState, record: dict[str, Any], epoch_end: bool = False) -> int:
        """Save as the next checkpoint number; an `epoch_end` checkpoint is ranked by the
        record's history (a stop's is not)."""
        number = (self.manager.latest_step() or 0) + 1
        leaves = _host_leaves(state.arrays())
        bad = [path for path, value in leaves  # the plateau's best loss starts at inf
               if not path.startswith("['plateau_state']")
               and np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value))]
        if bad:
            raise TrainingDiverged(f"the state holds non-finite values ({bad[0]}); "
                                   "not checkpointed")
        record = {**record, "checksums": {"arrays": _arrays_sha256(leaves),
                                          "record": _record_sha256(record)}}
        history = record["history"]
        metrics = ({"new_best_epoch": len(history) if latest_is_best(history) else 0}
                   if epoch_end else None)
        with _QuietWhenDiskFull() as quiet, _unranked_by_design(metrics is None):
            try:
                saved = self.manager.save(number, metrics=metrics, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state.arrays()),
                    record=ocp.args.JsonSave(record)))
                self.manager.wait_until_finished()
            except Exception as err:
                if not disk_full(err):
                    raise
                # Raised below, once orbax's traceback (and its abandoned writes) can be collected
                quiet.disk_full = True
        if quiet.disk_full:
            raise DiskFull(f"{self.run_dir}: the disk is full, so checkpoint {number} was not "
                           "saved; the earlier checkpoints are intact: free some space, then "
                           "--resume")
        assert saved, "orbax skips a step number it has seen; ours only grow"
        return number

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def best(self) -> int | None:
        """The best epoch's checkpoint (`metrics.best_epoch`)."""
        return self.manager.best_step()

    def restore(self, number: int, template: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """Checkpoint `number` (shaped like `template`) and its record, both verified."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template.arrays())
        try:
            restored = self.manager.restore(number, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        except OSError as err:
            if not isinstance(err, FileNotFoundError):  # e.g. permissions: not the files' fault
                raise
            raise CorruptCheckpoint(f"checkpoint {number} in {self.folder} is missing a file "
                                    f"({_first_line(err)})") from None
        except Exception as err:  # orbax and tensorstore raise many types for damaged files
            raise CorruptCheckpoint(f"checkpoint {number} in {self.folder} cannot be read "
                                    f"({_first_line(err)})") from None
        record = dict(restored["record"] or {})
        checksums = record.pop("checksums", None)
        found = {"arrays": _arrays_sha256(_host_leaves(restored["state"])),
                 "record": _record_sha256(record)}
        if checksums != found:
            raise CorruptCheckpoint(f"checkpoint {number} in {self.folder} does not match the "
                                    "checksums saved with it")
        return template.replace(**restored["state"]), record

    def restore_newest_intact(self, template: TrainState, warn: Callable[[str], None]
                              ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest checkpoint that restores intact, None if there is none at all.

        Damaged ones newer than it are named in a warning and moved to `corrupt_checkpoints/`,
        out of orbax's way; if no checkpoint is intact, nothing is moved and this raises.
        """
        damaged: list[int] = []
        numbers = sorted(self.manager.all_steps(), reverse=True)
        for index, number in enumerate(numbers):
            try:
                restored = self.restore(number, template)
            except CorruptCheckpoint as err:
                older = "; trying an older one" if index + 1 < len(numbers) else ""
                warn(f"warning: {err}{older}")
                damaged.append(number)
                continue
            self._set_aside(damaged)
            if damaged:
                warn(f"warning: continuing from checkpoint {number}; the damaged ones are in "
                     f"{self.corrupt_folder}")
            return restored
        if damaged:
            raise CorruptCheckpoint(f"{self.run_dir}: no intact checkpoint to resume from "
                                    f"(damaged: {', '.join(map(str, damaged))}); nothing was "
                                    "changed")
        return None

    def _set_aside(self, numbers: list[int]) -> None:
        if numbers and is_primary():
            self.corrupt_folder.mkdir(exist_ok=True)
            for number in numbers:
                shutil.move(self.folder / str(number),
                            self.corrupt_folder / f"{number}-{time.time_ns()}")
        barrier("checkpoints-set-aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


@dataclass
class LoadedRun:
    """A finished (or interrupted) run, ready for analysis."""

    config: ExperimentConfig
    model: TinyTransformerLM
    params: Any
    tokenizer: Tokenizer
    checkpoint: int  # the number of the checkpoint `params` came from
    record: dict[str, Any]  # that checkpoint's record: history, and progress if mid-epoch

    @property
    def epoch(self) -> int:
        """Epochs completed before the checkpoint."""
        return len(self.record["history"])

    @property
    def position(self) -> str:
        """Where in training the params come from: "epoch 6", or "epoch 6 + 250 steps"."""
        progress = self.record.get("epoch_in_progress")
        steps = progress["steps_done"] if progress else 0
        return f"epoch {self.epoch}" + (f" + {steps} steps" if steps else "")


def load_run(run_dir: str | Path, which: str = "best", precision: str = "fp32") -> LoadedRun:
    """Restore a run's `best` or `latest` params, with its config, model and tokenizer."""
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    run = RunFolder(run_dir)
    cfg = run.read_config()
    if run.file(run.MODEL).is_file() and not run.checkpoints.is_dir():
        return _load_published(run, cfg, precision)
    checkpoints = RunCheckpoints(run, read_only=True)
    try:
        number = checkpoints.best() if which == "best" else checkpoints.latest()
        if number is None:
            raise UserError(f"{run_dir}: no checkpoint to load")
        state, record = checkpoints.restore(number, create_train_state(cfg, precision))
    finally:
        checkpoints.close()
    return LoadedRun(cfg, build_model(cfg, compute_dtype(precision)), state.eval_params(),
                     run.read_tokenizer(), number, record)


def _load_published(run: RunFolder, cfg: ExperimentConfig, precision: str) -> LoadedRun:
    """A published model (`run.published`): its one set of weights, with the history up to the
    checkpoint they came from."""
    params, metadata = read_weights(run.file(run.MODEL))
    expected = jax.eval_shape(lambda: create_train_state(cfg, precision).params)
    shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), params)
    if shapes != jax.tree.map(lambda leaf: tuple(leaf.shape), expected):
        raise UserError(f"{run.file(run.MODEL)}: the weights do not fit the model of "
                        f"{run.file(run.CONFIG)}")
    history = run.read_history() if run.has_history() else []
    epochs = int(metadata.get("epochs", len(history)))
    return LoadedRun(cfg, build_model(cfg, compute_dtype(precision)), params,
                     run.read_tokenizer(), int(metadata.get("checkpoint", 0)),
                     {"history": history[:epochs], "epoch_in_progress": None})
