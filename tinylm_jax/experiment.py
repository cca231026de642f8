"""One experiment end to end: data, run folder, epochs with early stopping, checkpoints, summary.

A run folder holds `config.json`, `tokenizer.json`, `history.csv` (one row per epoch),
`attention_by_epoch.csv` (attention statistics from initialisation on), `summary.json` and
`checkpoints/`. Every check of the user's input happens before anything is written or trained;
an existing folder is continued (`resume`) or replaced (`overwrite`), never silently overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from tinylm_jax.attention import EPOCH_FIELDS, EPOCHS_FILE, StatWindows, epoch_rows
from tinylm_jax.checkpoint import RunCheckpoints, read_run_tokenizer
from tinylm_jax.config import EXPERIMENT_NAMES, ExperimentConfig, UserError, load_config
from tinylm_jax.data import Dataset, build_dataset, file_sha256, read_corpus, resolve_corpus
from tinylm_jax.model import build_model, count_params, init_params
from tinylm_jax.parallel import (
    barrier,
    check_batch_fits,
    data_mesh,
    is_primary,
    local_replica,
    replicate,
)
from tinylm_jax.runfolder import (
    RunFolderLock,
    check_resumable,
    check_run_folder,
    clear_run_folder,
    write_csv_atomic,
    write_text_atomic,
)
from tinylm_jax.signals import StopSignals
from tinylm_jax.train import (
    EpochProgress,
    TrainingDiverged,
    compute_dtype,
    compute_dtype_name,
    create_train_state,
    epoch_steps,
    evaluate,
    train_epoch,
)

# The seed notebook's printed validation perplexity after each epoch (its figure 2's curves);
# Table 1 is each curve's minimum.
SEED_VAL_PPL = {
    "baseline": (78.06, 67.09, 62.34, 60.94, 60.14, 60.00, 60.19),
    "medium": (79.47, 69.06, 64.60, 63.75, 63.24, 63.73),
    "wider": (87.97, 74.69, 67.99, 64.77, 62.19, 60.51, 59.65, 59.17, 58.56, 58.35, 58.37),
}
# The seed report's Table 1: best validation perplexity and the epoch it was reached.
SEED_TABLE1 = {key: (min(curve), curve.index(min(curve)) + 1)
               for key, curve in SEED_VAL_PPL.items()}
# Tokens of the seed's corpus in its 500-entry BPE: they fix the windows each of its epochs saw.
SEED_NUM_TOKENS = 447_717
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_ppl", "lr", "epoch_seconds",
                  "train_tokens_per_s")
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


def _run_settings(opts: RunOptions, corpus_sha256: str) -> dict[str, Any]:
    """What config.json records beside the config; a resume must match all of it."""
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
    if not dry_run:
        check_run_folder(opts.out_dir, opts.resume, opts.overwrite)
    corpus = resolve_corpus(opts.data)
    text = read_corpus(corpus)
    corpus_sha256 = file_sha256(corpus)
    tokenizer = None
    if opts.resume and not dry_run:
        check_resumable(opts.out_dir, cfg, _run_settings(opts, corpus_sha256))
        tokenizer = read_run_tokenizer(opts.out_dir)
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


def should_stop(history: list[dict[str, Any]], cfg: ExperimentConfig) -> bool:
    """The seed's rule: `early_stop_patience` epochs in a row without a new best PPL."""
    best = best_epoch(history)
    return bool(history) and best is not None and len(history) - best >= cfg.early_stop_patience


def package_versions(*extra: str) -> dict[str, str]:
    """Installed versions of the packages a run's numbers depend on, and of `extra` ones."""
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tokenizers", "numpy", *extra)
    return {name: importlib.metadata.version(name) for name in names}


def _print(message: str) -> None:
    print(message, flush=True)  # flushed, so that a log file follows the run


def train_prepared(run: PreparedRun, log: Callable[[str], None] = _print) -> dict[str, Any]:
    """Train a prepared run to its end (epoch limit or early stop); returns the summary.

    Raises `RunStopped` after checkpointing, if a signal or `stop_at_step` stops it first, and
    after the summary if a signal came as the run ended (so that `all` goes no further).
    """
    opts, out = run.opts, run.opts.out_dir
    primary = is_primary()  # with several processes, one writes the files; all checkpoint
    log = log if primary else (lambda _: None)
    barrier("checked")  # every process has read the run folder before it changes
    began = time.perf_counter()
    with RunFolderLock(out) if primary else contextlib.nullcontext(), StopSignals() as signals:
        if primary:  # checked again under the lock: another run may have used it since
            check_run_folder(out, opts.resume, opts.overwrite)
            if opts.overwrite and not opts.resume:
                clear_run_folder(out)
        barrier("cleared")
        checkpoints = RunCheckpoints(out)
        try:
            start = _resume_point(run, checkpoints, log)
            if primary:  # only now: a resume refused above has changed nothing
                _write_run_files(run, start)
            barrier("written")
            history, wall = _train_epochs(run, checkpoints, signals, start, began, log)
        finally:
            checkpoints.close()
        summary = _summary(run, history, wall)
        if primary:
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"{run.cfg.name}: best val_ppl={summary['best_val_ppl']:.2f} at epoch "
        f"{summary['best_epoch']} ({out})")
    if signals.received is not None:
        raise RunStopped(f"stopped by {signals.signal_name} as {run.cfg.name} finished",
                         signals.exit_code)
    return summary


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    out = run.opts.out_dir
    if not run.opts.resume:  # a resumed run keeps the tokenizer it was trained with
        run.data.tokenizer.save(str(out / "tokenizer.json"))
    config_record = {"experiment": run.cfg.to_dict(), **_run_settings(run.opts, run.corpus_sha256)}
    write_text_atomic(out / "config.json", json.dumps(config_record, indent=2) + "\n")
    if start.history:  # after a fallback to an older checkpoint, the later rows are gone
        write_csv_atomic(out / "history.csv", HISTORY_FIELDS, start.history)
    if start.attention:
        write_csv_atomic(out / EPOCHS_FILE, EPOCH_FIELDS, start.attention)


def _train_epochs(run: PreparedRun, checkpoints: RunCheckpoints, signals: StopSignals,
                  start: _Start, began: float, log: Callable[[str], None]
                  ) -> tuple[list[dict[str, Any]], float]:
    """The epoch loop from `start`; returns the history and the run's total wall time."""
    cfg, opts, out = run.cfg, run.opts, run.opts.out_dir
    data = dataclasses.replace(run.data, tokens=replicate(run.data.tokens, run.mesh))
    steps = epoch_steps(cfg, run.data, opts.max_steps_per_epoch)
    state, history, progress = start.state, start.history, start.progress
    attention = start.attention
    log(f"training {cfg.name} in {out}: {steps} steps per epoch, up to {cfg.num_epochs} epochs")

    def wall() -> float:
        return start.earlier_seconds + time.perf_counter() - began

    def save(val_loss: float | None = None, progress: EpochProgress | None = None) -> int:
        record = {"history": history, "attention_by_epoch": attention, "wall_time_s": wall(),
                  "epoch_in_progress": progress.to_record() if progress else None}
        return checkpoints.save(state, record, val_loss)

    while len(history) < cfg.num_epochs and not should_stop(history, cfg):
        epoch = len(history) + 1
        progress = progress or EpochProgress(epoch, steps)
        done_before = progress.steps_done
        until = None if opts.stop_at_step is None else opts.stop_at_step - (epoch - 1) * steps
        lr = state.learning_rate
        state, progress = train_epoch(state, data, cfg, progress, until, opts.progress,
                                      opts.steps_per_chunk, run.mesh, signals.requested)
        val_began = time.perf_counter()
        val_loss = (evaluate(state, data, cfg, opts.steps_per_chunk, run.mesh, signals.requested,
                             opts.progress) if progress.finished else None)
        val_seconds = time.perf_counter() - val_began  # logged only: history.csv keeps its columns
        if val_loss is None:  # stopped at stop_at_step, or by a signal
            saved = save(progress=progress) if progress.steps_done > done_before else None
            if until is not None and progress.steps_done >= until and not progress.finished:
                reason, code = f"stopped at step {opts.stop_at_step} as asked", 0
            else:
                reason, code = f"stopped by {signals.signal_name}", signals.exit_code
            raise RunStopped(_stop_message(reason, progress, saved, out), code)
        if not math.isfinite(val_loss):  # train losses were checked chunk by chunk
            raise TrainingDiverged(f"epoch {epoch}: non-finite validation loss ({val_loss}); "
                                   "stopped without checkpointing it")
        state = state.step_plateau(val_loss)
        history.append({"epoch": epoch, "train_loss": progress.train_loss,
                        "val_loss": val_loss, "val_ppl": perplexity(val_loss), "lr": lr,
                        "epoch_seconds": progress.seconds,
                        "train_tokens_per_s": progress.tokens_per_s})
        if attention is not None:
            attention.extend(_attention_rows(run, state, epoch))
        save(val_loss)
        progress = None
        if is_primary():
            write_csv_atomic(out / "history.csv", HISTORY_FIELDS, history)
            if attention is not None:
                write_csv_atomic(out / EPOCHS_FILE, EPOCH_FIELDS, attention)
        row = history[-1]
        note = "new best" if best_epoch(history) == epoch else "no improvement"
        log(f"epoch {epoch}/{cfg.num_epochs}: train_loss={row['train_loss']:.4f} "
            f"val_loss={val_loss:.4f} val_ppl={row['val_ppl']:.2f} lr={lr:.2e} "
            f"train {row['epoch_seconds']:.1f}s at {row['train_tokens_per_s']:,.0f} tok/s, "
            f"validation {val_seconds:.1f}s ({note})")
    return history, wall()


def _position(epochs_done: int, progress: EpochProgress | None) -> str:
    if progress is None:
        return f"the end of epoch {epochs_done}"
    return f"epoch {progress.epoch}, step {progress.steps_done} of {progress.steps_total}"


def _stop_message(reason: str, progress: EpochProgress, saved: int | None, out: Path) -> str:
    where = _position(progress.epoch - 1, progress)
    if progress.finished:
        where += " (before its validation)"
    kept = (f"saved checkpoint {saved} in {out / 'checkpoints'}" if saved is not None
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


def seed_experiment(key: str, experiment: str) -> str | None:
    """Which of the seed's experiments (baseline, medium, wider) a run keyed `key` reproduces:
    the key itself if it is one, else the one whose config is named `experiment`; or None."""
    if key in SEED_TABLE1:
        return key
    names = {load_config(name).name: name for name in EXPERIMENT_NAMES}
    return names.get(experiment)


def seed_result(key: str, experiment: str) -> tuple[float, int] | None:
    """The seed's (best PPL, epoch) for a run keyed `key`, as `seed_experiment` matches it."""
    seed = seed_experiment(key, experiment)
    return SEED_TABLE1[seed] if seed else None


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: our best PPL and epoch per experiment beside the seed's Table 1."""
    lines = ["| Experiment | Best PPL | Epoch | Seed PPL | Seed epoch | PPL difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, summary in summaries.items():
        ours = f"| {summary['experiment']} | {summary['best_val_ppl']:.2f} | " \
               f"{summary['best_epoch']} |"
        seed = seed_result(key, summary["experiment"])
        if seed is None:
            lines.append(f"{ours} - | - | - |")
            continue
        seed_ppl, seed_epoch = seed
        diff = (summary["best_val_ppl"] - seed_ppl) / seed_ppl
        lines.append(f"{ours} {seed_ppl:.2f} | {seed_epoch} | {diff:+.1%} |")
    return "\n".join(lines) + "\n"
