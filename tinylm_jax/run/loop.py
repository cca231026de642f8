"""The training loop, in one place and in the order it runs.

`start` finds where a run stands: a fresh state, or the newest intact checkpoint. `run_epochs`
goes on from there, epoch by epoch. An epoch is the training between two evaluations: one pass
over the training windows by default, `eval_every` steps when the experiment sets it
(`core.protocol`, the one clock of a run):
  1. the epoch's training chunks, each built and launched while the one before is collected
     (`train_epoch`), with a checkpoint every `checkpoint_every` steps or seconds if asked;
  2. the evaluation (`evaluate`): every validation window, or the protocol's fixed sample;
  3. the plateau schedule's step on the validation loss;
  4. the epoch hooks (e.g. the attention record), each adding rows of its own;
  5. the checkpoint, history.csv and the hooks' files, and the epoch's log line;
  6. the decision to go on.
The metrics writer, if there is one, receives the training loss, rate, gradient norm and
throughput every `log_every` steps, and every evaluation.
It returns why it stopped, as a value (`Stop`): the run finished, stopped early, reached
`--stop-at-step`, or was asked to stop by a signal. A stop mid-epoch is checkpointed at its exact
position first, so that `--resume` continues it with nothing lost or changed. Only a non-finite
loss is an exception (`TrainingDiverged`): nothing is checkpointed after one.

Nothing here changes a result: the chunk size, the checkpoints, the metrics, the bars and the
clocks only decide how the same steps are launched, kept and shown. `core.train` holds the steps
themselves.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.data import Dataset
from tinylm_jax.core.metrics import latest_is_best, perplexity, should_stop
from tinylm_jax.core.parallel import is_primary, shard_batch_rows
from tinylm_jax.core.protocol import Clock
from tinylm_jax.core.train import (
    TrainingDiverged,
    TrainState,
    default_steps_per_chunk,
    eval_chunk,
    token_weighted_mean,
    train_chunk,
)
from tinylm_jax.run.checkpoint import RunCheckpoints
from tinylm_jax.run.folder import RunFolder
from tinylm_jax.run.metrics_writer import MetricsWriter
from tinylm_jax.run.signals import StopSignals

T = TypeVar("T")


class StopReason(enum.Enum):
    FINISHED = "finished"  # the epoch limit, or the step budget
    EARLY_STOP = "early stop"  # the protocol's patience ran out
    STOP_AT_STEP = "stop at step"  # --stop-at-step: checkpointed, --resume continues
    SIGNAL = "signal"  # SIGTERM or SIGINT: checkpointed, --resume continues


@dataclasses.dataclass(frozen=True)
class Stop:
    """Why a run stopped, and what to tell the user about it."""

    reason: StopReason
    message: str
    ended: bool  # the protocol has run its course (the epoch limit or the early stop)
    signal: int | None = None  # the signal's number, for SIGNAL

    @property
    def resumable(self) -> bool:
        """Stopped on request before the protocol's end, or before the runs after it."""
        return self.reason in (StopReason.STOP_AT_STEP, StopReason.SIGNAL)


class EpochHook(Protocol):
    """Something recorded at the start of a run and after every epoch, resumed with the run.

    Its rows travel in every checkpoint's record under `name` (so that a resume continues them
    byte for byte) and are written to `<name>.csv` in the run folder, with columns `fields`.
    """

    name: str
    fields: tuple[str, ...]

    def start(self, state: TrainState) -> list[dict[str, Any]]:
        """Rows for the initial state (a fresh run only)."""

    def epoch_end(self, epoch: int, state: TrainState, metrics: dict[str, Any]
                  ) -> list[dict[str, Any]]:
        """Rows for the state after `epoch`, its plateau step taken; `metrics` is the epoch's
        row of history.csv (its step, losses, rate and times)."""


RECORD_KEYS = ("history", "wall_time_s", "epoch_in_progress")  # a hook may use none of these


def _check_hooks(hooks: tuple[EpochHook, ...]) -> None:
    """Each hook's rows go under its own name, in the record and as `<name>.csv`."""
    names = [hook.name for hook in hooks]
    clashes = sorted({name for name in names if names.count(name) > 1 or name in RECORD_KEYS})
    if clashes:
        raise ValueError(f"epoch hook names must be distinct and not {', '.join(RECORD_KEYS)}: "
                         f"{', '.join(clashes)}")


@dataclasses.dataclass
class EpochProgress:
    """How far one epoch of the protocol has got: enough to continue it mid-way with nothing
    changed.

    The per-step sums are kept, not a running total, so that an epoch continued after a stop sums
    exactly the same numbers in the same order as one that ran straight through.
    """

    epoch: int  # 1-based epoch number: with the clock, it fixes which steps the epoch takes
    steps_total: int  # optimiser steps this epoch takes when it runs to its end
    steps_done: int = 0  # steps taken so far
    loss_sums: list[float] = dataclasses.field(default_factory=list)  # summed CE, one per step
    token_counts: list[float] = dataclasses.field(default_factory=list)  # its tokens, per step
    lr: float | None = None  # the learning rate at the epoch's first step (history's lr)
    seconds: float = 0.0  # training time spent on this epoch so far, over every session
    tokens_per_s: float = math.nan  # throughput of the latest session, compilation excluded
    # What that throughput sums over the session's stretches of the epoch (a checkpoint every
    # so many steps splits it); a new session starts them again.
    session_tokens: float = dataclasses.field(default=0.0, metadata={"session": True})
    session_seconds: float = dataclasses.field(default=0.0, metadata={"session": True})

    @property
    def finished(self) -> bool:
        return self.steps_done == self.steps_total

    @property
    def train_loss(self) -> float:
        """Token-weighted mean training loss over the steps done."""
        return token_weighted_mean(self.loss_sums, self.token_counts)

    def to_record(self) -> dict[str, Any]:
        """What a checkpoint keeps: every field but the session's own."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if not self.__dataclass_fields__[key].metadata.get("session")}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EpochProgress:
        return cls(**record)


@dataclasses.dataclass
class Position:
    """Where a run stands: what a checkpoint holds and a resume continues from."""

    state: TrainState  # replicated over the run's mesh
    history: list[dict[str, Any]]  # one row per finished epoch (history.csv)
    hook_rows: dict[str, list[dict[str, Any]]]  # each hook's rows so far, by hook name
    progress: EpochProgress | None = None  # the epoch in progress, if stopped mid-way
    wall_time_s: float = 0.0  # the run's wall time at its last save, all sessions together

    def steps_taken(self, clock: Clock) -> int:
        """Optimiser steps taken since the run began."""
        first = clock.epoch_span(len(self.history) + 1)[0]
        return (first + self.progress.steps_done if self.progress
                else min(first, clock.total_steps))

    def record(self) -> dict[str, Any]:
        """The checkpoint's record: everything but the state's arrays."""
        return {"history": self.history, **self.hook_rows, "wall_time_s": self.wall_time_s,
                "epoch_in_progress": self.progress.to_record() if self.progress else None}


@dataclasses.dataclass(frozen=True)
class Loop:
    """One run's loop: what it trains on, what it records, and how it runs."""

    cfg: ExperimentConfig
    data: Dataset  # tokens replicated over `mesh`
    mesh: Mesh  # the devices each batch is split over
    clock: Clock  # the run's steps, epochs and windows
    hooks: tuple[EpochHook, ...] = ()
    steps_per_chunk: int | None = None  # None: the backend's default; changes no result
    stop_at_step: int | None = None  # stop once the run has taken this many steps in all
    checkpoint_every: int | None = None  # also checkpoint every this many steps
    checkpoint_seconds: float | None = None  # also checkpoint once this long has passed
    show_progress: bool = True  # bars, on a terminal only
    signals: StopSignals = dataclasses.field(default_factory=StopSignals)  # polled between chunks
    log: Callable[[str], None] = print
    writer: MetricsWriter | None = None  # None: no metrics written
    log_every: int = 10  # steps between the training metrics the writer receives
    # The chunk executables compiled so far, by (function, seq_len, chunk shape): one loop's,
    # never shared (`_Pass`).
    compiled: dict[tuple[Any, ...], Any] = dataclasses.field(default_factory=dict, init=False)

    @property
    def steps_per_epoch(self) -> int:
        """The steps of a whole epoch of the protocol (the last may be shorter)."""
        return self.clock.eval_every

    def plan(self, begin: int, end: int) -> list[tuple[int, int]]:
        """Rows [begin, end) of a pass as chunks: (first row, rows) each."""
        size = self.steps_per_chunk or default_steps_per_chunk()
        return [(first, min(size, end - first)) for first in range(begin, end, size)]

    def placed(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A chunk's rows (C, B), split over the mesh."""
        return shard_batch_rows(rows, self.mesh)


def start(loop: Loop, checkpoints: RunCheckpoints, fresh: TrainState, resume: bool,
          warn: Callable[[str], None]) -> Position:
    """A fresh start (the hooks record the initial state), or the newest intact checkpoint's
    position when resuming; refuses a `stop_at_step` the run has already passed."""
    _check_hooks(loop.hooks)
    restored = checkpoints.restore_newest_intact(fresh, warn) if resume else None
    if restored is None:
        position = Position(fresh, [], {hook.name: hook.start(fresh) for hook in loop.hooks})
    else:
        state, record = restored
        missing = [hook.name for hook in loop.hooks if hook.name not in record]
        if missing:
            raise UserError(f"{checkpoints.run_dir}: the run was begun without "
                            f"{', '.join(missing)}; it cannot be resumed with it")
        progress = record["epoch_in_progress"]
        position = Position(state, record["history"],
                            {hook.name: record[hook.name] for hook in loop.hooks},
                            EpochProgress.from_record(progress) if progress else None,
                            record["wall_time_s"])
        loop.log(f"resumed {checkpoints.run_dir} at "
                 f"{_where(len(position.history), position.progress)}")
    done = position.steps_taken(loop.clock)
    if loop.stop_at_step is not None and loop.stop_at_step <= done:
        raise UserError(f"--stop-at-step {loop.stop_at_step}: the run has already taken "
                        f"{done} steps")
    return position


def protocol_ended(cfg: ExperimentConfig, history: list[dict[str, Any]], epochs: int) -> bool:
    """Whether a run with this history is over: all its `epochs` run, or stopped early."""
    return len(history) >= epochs or should_stop(history, cfg)


def run_epochs(loop: Loop, position: Position, folder: RunFolder, checkpoints: RunCheckpoints,
               began: float) -> Stop:
    """Epochs from `position` on, until the protocol ends or a stop is asked for; `position`
    follows along, saved to `checkpoints` and written to `folder` after every epoch. `began` is
    when this session started (for the run's wall time)."""
    cfg, clock = loop.cfg, loop.clock
    if protocol_ended(cfg, position.history, clock.epochs):  # resumed after the protocol's end
        loop.log(f"{cfg.name} in {folder}: nothing left to train (its protocol has ended)")
    else:
        loop.log(f"training {cfg.name} in {folder}: {loop.steps_per_epoch} steps per epoch, "
                 f"up to {clock.epochs} epochs")

    earlier_seconds = position.wall_time_s  # the sessions before this one
    last_save = time.monotonic()

    def save(epoch_end: bool = False) -> int:
        nonlocal last_save
        position.wall_time_s = earlier_seconds + time.perf_counter() - began
        if loop.writer is not None:  # the metrics up to the checkpoint, no further
            loop.writer.flush()
        number = checkpoints.save(position.state, position.record(), epoch_end)
        last_save = time.monotonic()
        return number

    while not protocol_ended(cfg, position.history, clock.epochs):
        epoch = len(position.history) + 1
        first, end = clock.epoch_span(epoch)
        progress = position.progress or EpochProgress(epoch, end - first,
                                                      lr=position.state.learning_rate)
        # A record from before the field has no lr: the rate now is the epoch's under the
        # plateau schedule, the only one those versions had.
        lr = position.state.learning_rate if progress.lr is None else progress.lr
        done_before = progress.steps_done
        position.state = train_epoch(loop, position.state, progress,  # 1
                                     _segment_end(loop, first, progress),
                                     None if loop.checkpoint_seconds is None
                                     else last_save + loop.checkpoint_seconds)
        position.progress = progress
        if not progress.finished:
            if _stop_asked(loop, first + progress.steps_done):
                saved = save() if progress.steps_done > done_before else None
                return _stopped(loop, progress, first, saved, folder)
            save()  # a checkpoint every so many steps or seconds
            continue
        val_began = time.perf_counter()
        val_loss = evaluate(loop, position.state)  # 2
        val_seconds = time.perf_counter() - val_began
        if val_loss is None:  # stopped by a signal during the evaluation
            saved = save() if progress.steps_done > done_before else None
            return _stopped(loop, progress, first, saved, folder)
        if not math.isfinite(val_loss):  # train losses were checked chunk by chunk
            raise TrainingDiverged(f"epoch {epoch}: non-finite validation loss ({val_loss}); "
                                   "stopped without checkpointing it")
        position.state = position.state.step_plateau(val_loss)  # 3
        row = {"epoch": epoch, "train_loss": progress.train_loss, "val_loss": val_loss,
               "val_ppl": perplexity(val_loss), "lr": lr, "epoch_seconds": progress.seconds,
               "train_tokens_per_s": progress.tokens_per_s, "step": end,
               "val_seconds": val_seconds}
        position.history.append(row)
        if loop.writer is not None:
            loop.writer.scalars(end, {"eval/loss": val_loss, "eval/ppl": row["val_ppl"]})
        for hook in loop.hooks:  # 4
            position.hook_rows[hook.name] += hook.epoch_end(epoch, position.state, dict(row))
        position.progress = None
        save(epoch_end=True)  # 5
        if is_primary():  # with several processes, process 0 writes the files
            write_epoch_files(folder, position, loop.hooks)
        _log_epoch(loop, position.history)
    # 6: the protocol has ended; a signal that came with its last epoch still stops what follows
    # (asked of every process, which all reach this line: none goes on alone).
    if loop.signals.requested():
        return Stop(StopReason.SIGNAL, f"stopped by {loop.signals.signal_name} as {cfg.name} "
                    "finished", True, loop.signals.received)
    if should_stop(position.history, cfg):
        return Stop(StopReason.EARLY_STOP, f"stopped early after epoch {len(position.history)}",
                    True)
    return Stop(StopReason.FINISHED, f"finished its {clock.epochs} epochs", True)


def _segment_end(loop: Loop, first: int, progress: EpochProgress) -> int:
    """Where in the epoch training pauses next: its end, --stop-at-step, or the next
    checkpoint every `checkpoint_every` steps (steps of the epoch)."""
    ends = [progress.steps_total]
    if loop.stop_at_step is not None:
        ends.append(loop.stop_at_step - first)
    if loop.checkpoint_every:
        taken = first + progress.steps_done
        ends.append((taken // loop.checkpoint_every + 1) * loop.checkpoint_every - first)
    return min(ends)


def _stop_asked(loop: Loop, taken: int) -> bool:
    """Whether training paused for a stop (--stop-at-step or a signal), not a checkpoint."""
    return (loop.stop_at_step is not None and taken >= loop.stop_at_step
            ) or loop.signals.requested()


def train_epoch(loop: Loop, state: TrainState, progress: EpochProgress, until: int | None = None,
                deadline: float | None = None) -> TrainState:
    """Continue the epoch from `progress.steps_done` in the clock's window order, to its end, to
    step `until` of it, or to the first chunk boundary at which a stop is asked for or the
    `deadline` (time.monotonic) has passed. Each chunk's rows are built as it is launched. No
    host sync inside a chunk: each chunk's losses are fetched and checked while the next one
    runs, so a non-finite loss raises a chunk late, before anything can save it."""
    cfg = loop.cfg
    first_step = loop.clock.epoch_span(progress.epoch)[0]
    end = progress.steps_total if until is None else min(progress.steps_total, until)
    plan = loop.plan(progress.steps_done, end)

    def rows(first: int, count: int) -> dict[str, np.ndarray]:
        return loop.clock.train_rows(first_step + first, first_step + first + count)

    one_pass = _Pass(loop, train_chunk, state, plan, rows)
    bar = _bar(loop.show_progress, progress.steps_total, f"epoch {progress.epoch}",
               progress.steps_done)

    def launched() -> Iterator[tuple[int, dict[str, jax.Array]]]:
        nonlocal state
        for first, count in plan:
            if loop.signals.requested() or (deadline is not None and first > plan[0][0]
                                            and time.monotonic() >= deadline):
                return  # (a deadline only after a chunk: each checkpoint saves some progress)
            state, metrics = one_pass.launch(state, loop.placed(rows(first, count)))
            yield first, metrics

    def collect(item: tuple[int, dict[str, jax.Array]]) -> None:
        first, metrics = item
        host = jax.device_get(metrics)
        steps = len(host["loss_sum"])
        if not np.all(np.isfinite(host["loss_sum"])):
            raise TrainingDiverged(f"epoch {progress.epoch}, steps {first + 1}-{first + steps}: "
                                   "non-finite training loss; stopped without checkpointing it")
        progress.loss_sums.extend(float(x) for x in host["loss_sum"])
        progress.token_counts.extend(float(x) for x in host["tokens"])
        progress.steps_done += steps
        one_pass.items += steps * cfg.batch_size * cfg.seq_len
        _write_train_metrics(loop, first_step + first, host, one_pass.rate())
        loss = progress.loss_sums[-1] / progress.token_counts[-1]
        bar.set_postfix_str(f"loss={loss:.4f} {one_pass.rate_text('tok')}", refresh=False)
        bar.update(steps)

    with bar:
        _collect_one_behind(launched(), collect)
    progress.seconds += one_pass.seconds()
    if one_pass.items:
        progress.session_tokens += one_pass.items
        progress.session_seconds += one_pass.items / one_pass.rate()
        progress.tokens_per_s = progress.session_tokens / progress.session_seconds
    return state


def _write_train_metrics(loop: Loop, first: int, host: dict[str, np.ndarray], rate: float
                         ) -> None:
    """The writer's training scalars of a chunk whose first step is `first` (0-based): those of
    every step that ends on a multiple of `log_every`, numbered by the steps taken."""
    if loop.writer is None:
        return
    for i in range(len(host["loss_sum"])):
        taken = first + i + 1
        if taken % loop.log_every == 0:
            loop.writer.scalars(taken, {
                "train/loss": float(host["loss_sum"][i] / host["tokens"][i]),
                "train/lr": float(host["lr"][i]), "train/grad_norm": float(host["grad_norm"][i]),
                "train/tokens_per_s": rate})


def evaluate(loop: Loop, state: TrainState) -> float | None:
    """Token-weighted mean loss over the clock's validation windows (all of them, or its fixed
    sample), in order, in compiled chunks; None if a stop was asked for first (the pass is
    abandoned between chunks)."""
    clock = loop.clock
    metrics: list[dict[str, jax.Array]] = []
    plan = loop.plan(0, clock.val_batches)

    def rows(first: int, count: int) -> dict[str, np.ndarray]:
        return clock.val_rows(loop.data.splits, first, first + count)

    one_pass = _Pass(loop, eval_chunk, state, plan, rows)
    bar = _bar(loop.show_progress, clock.val_batches, "validation")
    stopped = False

    def launched() -> Iterator[tuple[float, dict[str, jax.Array]]]:
        nonlocal stopped
        for first, count in plan:
            if metrics and loop.signals.requested():
                stopped = True
                return
            chunk = rows(first, count)
            metrics.append(one_pass.launch(state, loop.placed(chunk)))
            yield float(chunk["weights"].sum()), metrics[-1]  # padding windows weigh 0

    def collect(item: tuple[float, dict[str, jax.Array]]) -> None:
        windows, chunk_metrics = item
        jax.block_until_ready(chunk_metrics)
        one_pass.items += windows
        bar.set_postfix_str(one_pass.rate_text("windows"), refresh=False)
        bar.update(len(chunk_metrics["tokens"]))

    with bar:
        _collect_one_behind(launched(), collect)
    if stopped:
        return None
    host = jax.device_get(metrics)
    return token_weighted_mean(np.concatenate([m["loss_sum"] for m in host]),
                               np.concatenate([m["tokens"] for m in host]))


def _collect_one_behind(launched: Iterable[T], collect: Callable[[T], None]) -> None:
    """`collect` each launched chunk once the next one is launched, and the last at the end:
    the host waits on a chunk while the device already runs the next."""
    previous: list[T] = []
    for item in launched:
        if previous:
            collect(previous.pop())
        previous.append(item)
    if previous:
        collect(previous.pop())


class _Pass:
    """One pass's chunks through `function` (`train_chunk` or `eval_chunk`), and its clock.

    Every chunk length the pass's `plan` needs is compiled ahead of time (from a chunk of that
    length that `rows` builds), before the clock starts, and kept in `loop.compiled`: the pass's
    rate counts the device's work alone, and an epoch of a single chunk has one too. Its seconds
    are the compilation's plus the clock's.
    """

    def __init__(self, loop: Loop, function: Any, state: TrainState,
                 plan: list[tuple[int, int]],
                 rows: Callable[[int, int], dict[str, np.ndarray]]):
        self.loop, self.function = loop, function
        began = time.perf_counter()
        for first, count in {count: (first, count) for first, count in plan}.values():
            key = self._key(count)
            if key not in loop.compiled:
                chunk = loop.placed(rows(first, count))
                loop.compiled[key] = function.lower(state, loop.data.tokens, chunk["starts"],
                                                    chunk["weights"],
                                                    seq_len=loop.cfg.seq_len).compile()
        self.compile_seconds = time.perf_counter() - began
        self.began = time.perf_counter()
        self.items = 0.0  # what the rate counts (tokens, windows) of the chunks collected

    def _key(self, count: int) -> tuple[Any, ...]:
        return (self.function, self.loop.cfg.seq_len, count)

    def launch(self, state: TrainState, chunk: dict[str, jax.Array]) -> Any:
        return self.loop.compiled[self._key(len(chunk["starts"]))](
            state, self.loop.data.tokens, chunk["starts"], chunk["weights"])

    def seconds(self) -> float:
        return self.compile_seconds + time.perf_counter() - self.began

    def rate(self) -> float:
        return self.items / max(time.perf_counter() - self.began, 1e-9)

    def rate_text(self, unit: str) -> str:
        return f"{self.rate():,.0f} {unit}/s" if self.items else ""


# tqdm's layout less its own rate (s/step), so that the throughput in the postfix still fits
# an 80-column terminal.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def _bar(show: bool, total: int, desc: str, initial: int = 0) -> tqdm:
    """A bar on a terminal only (tqdm's disable=None: logs stay clean), cleared when done so that
    the epoch's line stands alone."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not show or None, leave=False,
                dynamic_ncols=True, bar_format=BAR_FORMAT)


def write_epoch_files(folder: RunFolder, position: Position,
                      hooks: tuple[EpochHook, ...] | list[EpochHook]) -> None:
    """history.csv and each hook's file, as `position` holds them."""
    if position.history:  # a fresh run has none yet
        folder.write_history(position.history)
    for hook in hooks:
        folder.write_rows(hook.name, hook.fields, position.hook_rows[hook.name])


def _log_epoch(loop: Loop, history: list[dict[str, Any]]) -> None:
    """The epoch's line."""
    row = history[-1]
    note = "new best" if latest_is_best(history) else "no improvement"
    at = f" (step {row['step']:,})" if loop.cfg.eval_every or loop.cfg.max_steps else ""
    loop.log(f"epoch {row['epoch']}/{loop.clock.epochs}{at}: train_loss={row['train_loss']:.4f} "
             f"val_loss={row['val_loss']:.4f} val_ppl={row['val_ppl']:.2f} lr={row['lr']:.2e} "
             f"train {row['epoch_seconds']:.1f}s at {row['train_tokens_per_s']:,.0f} tok/s, "
             f"validation {row['val_seconds']:.1f}s ({note})")


def _stopped(loop: Loop, progress: EpochProgress, first: int, saved: int | None,
             folder: RunFolder) -> Stop:
    """The stop of an epoch cut short (its first step `first`), by `--stop-at-step` or else by
    a signal."""
    where = _where(progress.epoch - 1, progress)
    if progress.finished:
        where += " (before its validation)"
    kept = (f"saved checkpoint {saved} in {folder.checkpoints}" if saved is not None
            else "nothing new to save")
    if (loop.stop_at_step is not None and first + progress.steps_done >= loop.stop_at_step
            and not progress.finished):
        return Stop(StopReason.STOP_AT_STEP,
                    f"stopped at step {loop.stop_at_step} as asked at {where}; {kept}", False)
    return Stop(StopReason.SIGNAL, f"stopped by {loop.signals.signal_name} at {where}; {kept}",
                False, loop.signals.received)


def _where(epochs_done: int, progress: EpochProgress | None) -> str:
    if progress is None:
        return f"the end of epoch {epochs_done}"
    return f"epoch {progress.epoch}, step {progress.steps_done} of {progress.steps_total}"
