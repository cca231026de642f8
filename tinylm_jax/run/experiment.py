"""One experiment end to end: data, run folder, epochs with early stopping, checkpoints, summary.

Every check of the user's input happens in `prepare`, before anything is written or trained; an
existing folder is continued (`resume`) or replaced (`overwrite`), never silently overwritten.
`train_prepared` then trains epoch by epoch (`_Training`), writing the files `RunFolder` owns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from tinylm_jax.core.attention_stats import StatWindows, epoch_rows
from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.data import Dataset, build_dataset, file_sha256, read_corpus, resolve_corpus
from tinylm_jax.core.metrics import best_epoch, perplexity, should_stop
from tinylm_jax.core.model import build_model, count_params, init_params
from tinylm_jax.core.parallel import (
    barrier,
    check_batch_fits,
    data_mesh,
    is_primary,
    local_replica,
    replicate,
)
from tinylm_jax.core.train import (
    EpochProgress,
    LoopOptions,
    TrainingDiverged,
    compute_dtype,
    compute_dtype_name,
    create_train_state,
    epoch_steps,
    evaluate,
    train_epoch,
)
from tinylm_jax.core.versions import package_versions
from tinylm_jax.run.checkpoint import RunCheckpoints
from tinylm_jax.run.folder import RunFolder
from tinylm_jax.run.signals import StopSignals

# Validation windows whose attention statistics are recorded at the start and after each epoch:
# enough for stable means, few enough to cost well under a second on a CPU.
ATTENTION_WINDOWS = 64


class RunStopped(Exception):
    """Training stopped on request, its exact position checkpointed; `--resume` continues it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path  # the run folder
    data: str | None = None  # corpus path; None means $TINYLM_DATA, then the download cache
    precision: str = "auto"  # auto | bf16 | fp32 compute
    max_steps_per_epoch: int | None = None  # cut epochs short, for quick runs
    resume: bool = False  # continue the run folder's latest checkpoint
    overwrite: bool = False  # replace an existing run folder
    progress: bool = True  # show training and validation bars (on a terminal only)
    steps_per_chunk: int | None = None  # steps per compiled call; None: the backend's default
    devices: int | None = None  # split batches over the first N devices; None: all of them
    stop_at_step: int | None = None  # checkpoint and stop once the run has taken this many steps


@dataclass(frozen=True)
class PreparedRun:
    cfg: ExperimentConfig
    opts: RunOptions
    corpus: Path
    corpus_sha256: str
    data: Dataset
    param_count: int
    mesh: Mesh  # the devices training splits each batch over
    attention_windows: StatWindows  # fixed validation windows for the per-epoch statistics

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.opts.out_dir)

    @property
    def settings(self) -> dict[str, Any]:
        """What config.json records beside the config; a resume must match all of it."""
        return _run_settings(self.opts, self.corpus_sha256)


def _run_settings(opts: RunOptions, corpus_sha256: str) -> dict[str, Any]:
    return {"precision": opts.precision,
            "compute_dtype": compute_dtype_name(opts.precision),
            "max_steps_per_epoch": opts.max_steps_per_epoch, "corpus_sha256": corpus_sha256}


def prepare(cfg: ExperimentConfig, opts: RunOptions, dry_run: bool = False) -> PreparedRun:
    """Validate everything and load the data; writes nothing. A dry run ignores the run folder."""
    compute_dtype(opts.precision)
    mesh = data_mesh(opts.devices)
    check_batch_fits(cfg.batch_size, mesh)
    for flag, value in (("--max-steps-per-epoch", opts.max_steps_per_epoch),
                        ("--steps-per-chunk", opts.steps_per_chunk),
                        ("--stop-at-step", opts.stop_at_step)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be positive, got {value}")
    folder = RunFolder(opts.out_dir)
    if not dry_run:
        folder.check_usable(opts.resume, opts.overwrite)
    corpus = resolve_corpus(opts.data)
    text = read_corpus(corpus)
    corpus_sha256 = file_sha256(corpus)
    tokenizer = None
    if opts.resume and not dry_run:
        folder.check_resumable(cfg, _run_settings(opts, corpus_sha256))
        tokenizer = folder.read_tokenizer()
    try:
        data = build_dataset(text, cfg, tokenizer)
    except UserError as err:  # the corpus cannot serve this config: say which corpus
        raise UserError(f"{corpus}: {err}") from None
    params = jax.eval_shape(lambda: init_params(build_model(cfg), cfg.seed))
    windows = StatWindows.spread(data.tokens, data.splits, data.tokenizer,
                                 min(ATTENTION_WINDOWS, data.splits.num_val))
    return PreparedRun(cfg, opts, corpus, corpus_sha256, data, count_params(params), mesh,
                       windows)


def describe(run: PreparedRun) -> str:
    """The dry run's report: resolved config, parameter count and window counts."""
    lines = [f"experiment: {run.cfg.name}"]
    lines += [f"  {key} = {value!r}" for key, value in run.cfg.to_dict().items() if key != "name"]
    splits = run.data.splits
    lines += [f"corpus: {run.corpus}",
              f"tokens: {splits.num_tokens:,}",
              f"parameters: {run.param_count:,}",
              f"windows: {splits.num_train:,} train / {splits.num_val:,} validation "
              f"(seq_len {splits.seq_len})",
              f"precision: {run.opts.precision} ({compute_dtype_name(run.opts.precision)} "
              f"compute on {jax.default_backend()})",
              f"devices: {run.mesh.devices.size} x {jax.devices()[0].device_kind} (each batch "
              "split over them)",
              f"run folder: {run.opts.out_dir}"]
    return "\n".join(lines)


def _print(message: str) -> None:
    print(message, flush=True)  # flushed, so that a log file follows the run


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def train_prepared(run: PreparedRun, log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Train a prepared run to its end (epoch limit or early stop); returns the summary.

    Raises `RunStopped` after checkpointing, if a signal or `stop_at_step` stops it first, and
    after the summary if a signal came as the run ended (so that `all` goes no further).
    """
    opts, folder = run.opts, run.folder
    primary = is_primary()  # with several processes, one writes the files; all checkpoint
    log = log if primary else (lambda _: None)
    barrier("checked")  # every process has read the run folder before it changes
    began = time.perf_counter()
    with folder.lock() if primary else contextlib.nullcontext(), StopSignals() as signals:
        if primary:  # checked again under the lock: another run may have used it since
            folder.check_usable(opts.resume, opts.overwrite)
            if opts.overwrite and not opts.resume:
                folder.clear()
        barrier("cleared")
        checkpoints = RunCheckpoints(folder)
        try:
            start = _resume_point(run, checkpoints, log)
            if primary:  # only now: a resume refused above has changed nothing
                _write_run_files(run, start)
            barrier("written")
            training = _Training(run, checkpoints, signals, start, began, log)
            history = training.run()
        finally:
            checkpoints.close()
        summary = _summary(run, history, training.wall())
        if primary:
            folder.write_summary(summary)
    log(f"{run.cfg.name}: best val_ppl={summary['best_val_ppl']:.2f} at epoch "
        f"{summary['best_epoch']} ({folder})")
    if signals.received is not None:
        raise RunStopped(f"stopped by {signals.signal_name} as {run.cfg.name} finished",
                         signals.exit_code)
    return summary


@dataclass
class _Start:
    """Where training starts: a fresh state, or a restored checkpoint's."""

    state: Any  # the TrainState, replicated over the run's mesh
    history: list[dict[str, Any]]
    progress: EpochProgress | None  # the epoch in progress, if stopped mid-way
    earlier_seconds: float  # wall time of the sessions before this one
    # attention_by_epoch.csv's rows so far; None for a run begun before the record existed,
    # which records none rather than a table without its epoch 0
    attention: list[dict[str, Any]] | None

    def global_step(self, steps_per_epoch: int) -> int:
        return len(self.history) * steps_per_epoch + (self.progress.steps_done
                                                      if self.progress else 0)


def _resume_point(run: PreparedRun, checkpoints: RunCheckpoints, log: Callable[[str], None]
                  ) -> _Start:
    """A fresh start, or the newest intact checkpoint when resuming; checks --stop-at-step.
    A fresh start records the attention of the initial params as epoch 0."""
    cfg, opts = run.cfg, run.opts
    start = _Start(replicate(create_train_state(cfg, opts.precision), run.mesh), [], None, 0.0,
                   [])
    restored = checkpoints.restore_newest_intact(start.state, _warn) if opts.resume else None
    if restored is not None:
        state, record = restored
        progress = (EpochProgress.from_record(record["epoch_in_progress"])
                    if record["epoch_in_progress"] else None)
        start = _Start(state, record["history"], progress, record["wall_time_s"],
                       record.get("attention_by_epoch"))
        log(f"resumed {opts.out_dir} at {_position(len(start.history), progress)}")
    done = start.global_step(epoch_steps(cfg, run.data, opts.max_steps_per_epoch))
    if opts.stop_at_step is not None and opts.stop_at_step <= done:
        raise UserError(f"--stop-at-step {opts.stop_at_step}: the run has already taken "
                        f"{done} steps")
    if restored is None:
        start.attention = _attention_rows(run, start.state, 0)
    return start


def _attention_rows(run: PreparedRun, state: Any, epoch: int) -> list[dict[str, Any]]:
    """The attention statistics of `state`'s params on the run's fixed validation windows,
    computed on one replica: the same rows in every process, and no collective."""
    model = build_model(run.cfg, compute_dtype(run.opts.precision))  # the run's own model
    return epoch_rows(model, local_replica(state.params), run.attention_windows, epoch)


def _write_run_files(run: PreparedRun, start: _Start) -> None:
    """config.json (the run's record), tokenizer.json, and the restored per-epoch files if any."""
    folder = run.folder
    if not run.opts.resume:  # a resumed run keeps the tokenizer it was trained with
        folder.write_tokenizer(run.data.tokenizer)
    folder.write_record(run.cfg, run.settings)
    if start.history:  # after a fallback to an older checkpoint, the later rows are gone
        folder.write_history(start.history)
    if start.attention:
        folder.write_attention_by_epoch(start.attention)


class _Training:
    """The epoch loop from a start: each epoch trains, validates, and is recorded; a stop on
    the way is checkpointed and raised as `RunStopped`."""

    def __init__(self, run: PreparedRun, checkpoints: RunCheckpoints, signals: StopSignals,
                 start: _Start, began: float, log: Callable[[str], None]):
        self.prepared, self.checkpoints, self.signals, self.log = run, checkpoints, signals, log
        self.state, self.history, self.attention = start.state, start.history, start.attention
        self.progress = start.progress
        self.earlier_seconds, self.began = start.earlier_seconds, began
        self.data = dataclasses.replace(run.data, tokens=replicate(run.data.tokens, run.mesh))
        self.steps = epoch_steps(run.cfg, run.data, run.opts.max_steps_per_epoch)
        self.options = LoopOptions(steps_per_chunk=run.opts.steps_per_chunk, mesh=run.mesh,
                                   show_progress=run.opts.progress,
                                   stop_requested=signals.requested)

    def wall(self) -> float:
        """The run's wall time over every session so far."""
        return self.earlier_seconds + time.perf_counter() - self.began

    def run(self) -> list[dict[str, Any]]:
        """Epochs until the limit or the early stop; returns the history."""
        cfg = self.prepared.cfg
        self.log(f"training {cfg.name} in {self.prepared.opts.out_dir}: {self.steps} steps per "
                 f"epoch, up to {cfg.num_epochs} epochs")
        while len(self.history) < cfg.num_epochs and not should_stop(self.history, cfg):
            self._epoch(len(self.history) + 1)
        return self.history

    def _epoch(self, epoch: int) -> None:
        progress = self.progress or EpochProgress(epoch, self.steps)
        done_before = progress.steps_done
        lr = self.state.learning_rate
        stop_at = self.prepared.opts.stop_at_step
        until = None if stop_at is None else stop_at - (epoch - 1) * self.steps
        cfg = self.prepared.cfg
        self.state, progress = train_epoch(self.state, self.data, cfg, progress, until,
                                           self.options)
        val_began = time.perf_counter()
        val_loss = (evaluate(self.state, self.data, cfg, self.options)
                    if progress.finished else None)
        if val_loss is None:  # stopped at stop_at_step, or by a signal
            self._stop(progress, until, progress.steps_done > done_before)
        self._record(progress, val_loss, lr, time.perf_counter() - val_began)

    def _save(self, val_loss: float | None = None, progress: EpochProgress | None = None
              ) -> int:
        record = {"history": self.history, "attention_by_epoch": self.attention,
                  "wall_time_s": self.wall(),
                  "epoch_in_progress": progress.to_record() if progress else None}
        return self.checkpoints.save(self.state, record, val_loss)

    def _stop(self, progress: EpochProgress, until: int | None, moved: bool) -> None:
        """Checkpoint the exact position (if training moved since the last checkpoint) and
        raise `RunStopped`."""
        saved = self._save(progress=progress) if moved else None
        if until is not None and progress.steps_done >= until and not progress.finished:
            reason, code = f"stopped at step {self.prepared.opts.stop_at_step} as asked", 0
        else:
            reason, code = f"stopped by {self.signals.signal_name}", self.signals.exit_code
        raise RunStopped(_stop_message(reason, progress, saved, self.prepared.opts.out_dir), code)

    def _record(self, progress: EpochProgress, val_loss: float, lr: float,
                val_seconds: float) -> None:
        """A finished epoch: the plateau schedule, the history, the attention statistics, the
        checkpoint, the files and the log line."""
        epoch = progress.epoch
        if not math.isfinite(val_loss):  # train losses were checked chunk by chunk
            raise TrainingDiverged(f"epoch {epoch}: non-finite validation loss ({val_loss}); "
                                   "stopped without checkpointing it")
        self.state = self.state.step_plateau(val_loss)
        row = {"epoch": epoch, "train_loss": progress.train_loss, "val_loss": val_loss,
               "val_ppl": perplexity(val_loss), "lr": lr, "epoch_seconds": progress.seconds,
               "train_tokens_per_s": progress.tokens_per_s}
        self.history.append(row)
        if self.attention is not None:
            self.attention.extend(_attention_rows(self.prepared, self.state, epoch))
        self._save(val_loss)
        self.progress = None
        if is_primary():
            self.prepared.folder.write_history(self.history)
            if self.attention is not None:
                self.prepared.folder.write_attention_by_epoch(self.attention)
        note = "new best" if best_epoch(self.history) == epoch else "no improvement"
        # validation's time is logged only: history.csv keeps its columns
        self.log(f"epoch {epoch}/{self.prepared.cfg.num_epochs}: "
                 f"train_loss={row['train_loss']:.4f} "
                 f"val_loss={val_loss:.4f} val_ppl={row['val_ppl']:.2f} lr={lr:.2e} "
                 f"train {row['epoch_seconds']:.1f}s at {row['train_tokens_per_s']:,.0f} tok/s, "
                 f"validation {val_seconds:.1f}s ({note})")


def _position(epochs_done: int, progress: EpochProgress | None) -> str:
    if progress is None:
        return f"the end of epoch {epochs_done}"
    return f"epoch {progress.epoch}, step {progress.steps_done} of {progress.steps_total}"


def _stop_message(reason: str, progress: EpochProgress, saved: int | None, out: Path) -> str:
    where = _position(progress.epoch - 1, progress)
    if progress.finished:
        where += " (before its validation)"
    kept = (f"saved checkpoint {saved} in {RunFolder(out).checkpoints}" if saved is not None
            else "nothing new to save")
    return f"{reason} at {where}; {kept}"


def _summary(run: PreparedRun, history: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    best = best_epoch(history)
    best_row = history[best - 1] if best else {"val_ppl": math.nan, "val_loss": math.nan}
    return {
        "experiment": run.cfg.name,
        "best_val_ppl": best_row["val_ppl"],
        "best_val_loss": best_row["val_loss"],
        "best_epoch": best,
        "epochs_run": len(history),
        "stopped_early": should_stop(history, run.cfg),
        "param_count": run.param_count,
        "num_tokens": run.data.splits.num_tokens,
        "train_windows": run.data.splits.num_train,
        "val_windows": run.data.splits.num_val,
        "max_steps_per_epoch": run.opts.max_steps_per_epoch,
        "precision": compute_dtype_name(run.opts.precision),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": int(run.mesh.devices.size),
        "versions": package_versions(),
        "wall_time_s": wall,
    }


def run_experiment(cfg: ExperimentConfig, opts: RunOptions,
                   log: Callable[[str], None] = _print) -> dict[str, Any]:
    return train_prepared(prepare(cfg, opts), log)
