"""One experiment end to end: data, run folder, the training loop, the summary.

Every check of the user's input happens in `prepare`, before anything is written or trained; an
existing folder is continued (`resume`) or replaced (`overwrite`), never silently overwritten.
`train_prepared` then opens the folder and runs `run.loop` on it, with the epoch hooks it is
given, and returns why the run stopped beside its summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from tinylm_jax.core.config import ExperimentConfig, UserError, require_positive
from tinylm_jax.core.data import Dataset, build_dataset, file_sha256, read_corpus, resolve_corpus
from tinylm_jax.core.metrics import best_epoch, should_stop
from tinylm_jax.core.model import build_model, count_params, init_params
from tinylm_jax.core.parallel import barrier, check_batch_fits, data_mesh, is_primary, replicate
from tinylm_jax.core.protocol import Clock
from tinylm_jax.core.token_cache import CacheUnwritable
from tinylm_jax.core.train import (
    check_schedule,
    compute_dtype_name,
    create_train_state,
)
from tinylm_jax.core.versions import cpu_name, package_versions
from tinylm_jax.run import loop
from tinylm_jax.run.checkpoint import RunCheckpoints
from tinylm_jax.run.folder import RunFolder
from tinylm_jax.run.loop import EpochHook, Stop
from tinylm_jax.run.metrics_writer import MetricsWriter
from tinylm_jax.run.products import products_for
from tinylm_jax.run.signals import StopSignals


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path  # the run folder
    data: str | None = None  # corpus path; None means $TINYLM_DATA, then the download cache
    precision: str = "auto"  # auto | bf16 | fp32 compute
    products: str = "auto"  # auto | xla | mkl: where a CPU's bf16 matrix products run
    max_steps_per_epoch: int | None = None  # cut epochs short, for quick runs
    resume: bool = False  # continue the run folder's latest checkpoint
    overwrite: bool = False  # replace an existing run folder
    progress: bool = True  # show training and validation bars (on a terminal only)
    steps_per_chunk: int | None = None  # steps per compiled call; None: the backend's default
    devices: int | None = None  # split batches over the first N devices; None: all of them
    stop_at_step: int | None = None  # checkpoint and stop once the run has taken this many steps
    checkpoint_every: int | None = None  # also checkpoint every this many steps
    checkpoint_minutes: float | None = None  # also checkpoint once this many minutes have passed
    metrics: bool = True  # write metrics.csv and TensorBoard's event files into the run folder
    log_every: int = 10  # steps between the training metrics written


@dataclass(frozen=True)
class PreparedRun:
    cfg: ExperimentConfig
    opts: RunOptions
    corpus: Path
    corpus_sha256: str
    data: Dataset
    param_count: int
    mesh: Mesh  # the devices training splits each batch over
    clock: Clock  # the run's steps, epochs and windows
    products: str = "xla"  # where the bf16 products run, resolved ("xla" or "mkl")
    products_why: str = ""  # why: one line

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.opts.out_dir)

    @property
    def settings(self) -> dict[str, Any]:
        """What config.json records beside the config; a resume must match all of it."""
        return _run_settings(self.opts, self.corpus_sha256, self.products)


def _run_settings(opts: RunOptions, corpus_sha256: str, products: str) -> dict[str, Any]:
    return {"precision": opts.precision,
            "compute_dtype": compute_dtype_name(opts.precision), "products": products,
            "max_steps_per_epoch": opts.max_steps_per_epoch, "corpus_sha256": corpus_sha256}


def prepare(cfg: ExperimentConfig, opts: RunOptions, dry_run: bool = False) -> PreparedRun:
    """Validate everything and load the data; writes nothing but the token cache (`core.
    token_cache`). A dry run ignores the run folder."""
    if opts.checkpoint_minutes is not None and jax.process_count() > 1:
        # Each process would read its own clock: they must all stop at the same chunk.
        raise UserError("--checkpoint-minutes works in one process; with several, use "
                        "--checkpoint-every")
    mesh = data_mesh(opts.devices)
    check_batch_fits(cfg.batch_size, mesh)
    for flag, value in (("--max-steps-per-epoch", opts.max_steps_per_epoch),
                        ("--steps-per-chunk", opts.steps_per_chunk),
                        ("--stop-at-step", opts.stop_at_step),
                        ("--checkpoint-every", opts.checkpoint_every),
                        ("--checkpoint-minutes", opts.checkpoint_minutes),
                        ("--log-every", opts.log_every)):
        require_positive(flag, value)
    folder = RunFolder(opts.out_dir)
    if not dry_run:
        folder.check_usable(opts.resume, opts.overwrite)
    corpus = resolve_corpus(opts.data)
    text = read_corpus(corpus)
    corpus_sha256 = file_sha256(corpus)
    tokenizer = None
    resuming = opts.resume and not dry_run
    if resuming:  # under auto, the products the run began with: nothing is measured
        products, products_why = (_products_to_resume(opts, folder, cfg)
                                  if opts.products == "auto"
                                  else products_for(opts.precision, opts.products, cfg))
        folder.check_resumable(cfg, _run_settings(opts, corpus_sha256, products))
        tokenizer = folder.read_tokenizer()
    try:  # the ids from the token cache where it has them: a resume tokenises nothing
        data = build_dataset(text, cfg, tokenizer, corpus_sha256)
    except CacheUnwritable:  # says which folder, and what to do
        raise
    except UserError as err:  # the corpus cannot serve this config: say which corpus
        raise UserError(f"{corpus}: {err}") from None
    clock = Clock.of(cfg, data.splits, opts.max_steps_per_epoch)
    check_schedule(cfg, clock.total_steps)
    params = jax.eval_shape(lambda: init_params(build_model(cfg), cfg.seed))
    if not resuming:  # last: `auto` times the products, once the rest is known to be sound
        products, products_why = products_for(opts.precision, opts.products, cfg)
    return PreparedRun(cfg, opts, corpus, corpus_sha256, data, count_params(params), mesh,
                       clock, products, products_why)


def _products_to_resume(opts: RunOptions, folder: RunFolder, cfg: ExperimentConfig
                        ) -> tuple[str, str]:
    """The products a run began with, for `--resume` under `auto`, if they can be had here."""
    began_on = folder.recorded("products")
    try:
        return products_for(opts.precision, began_on, cfg)[0], "the run's own, as it began"
    except UserError as err:
        raise UserError(f"{folder}: the run trained on {began_on} products, which cannot be "
                        f"had here ({str(err).split(': ', 1)[-1]}); resume it with them, or "
                        "start it anew") from None


def set_member(opts: RunOptions) -> RunOptions:
    """The options of one run of a set (several experiments or seeds): `--resume` after an
    interruption of the set continues the runs begun, and those not begun yet simply start."""
    return dataclasses.replace(opts, resume=opts.resume and opts.out_dir.exists())


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
              f"products: {run.products} ({run.products_why})",
              f"devices: {run.mesh.devices.size} x {jax.devices()[0].device_kind} (each batch "
              "split over them)",
              f"run folder: {run.opts.out_dir}"]
    return "\n".join(lines)


def _print(message: str) -> None:
    print(message, flush=True)  # flushed, so that a log file follows the run


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunResult:
    """How a run ended: why it stopped, and its summary if it reached the protocol's end."""

    stop: Stop
    summary: dict[str, Any] | None  # None when stopped before the end (--resume continues)


def train_prepared(run: PreparedRun, hooks: Sequence[EpochHook] = (),
                   log: Callable[[str], None] = _print) -> RunResult:
    """Train a prepared run until the protocol ends or a stop is asked for, recording `hooks`
    at the start and after every epoch. The summary is written when the protocol ends (with a
    signal that came as it ended too, so that a sequence of runs goes no further); a resume of
    a run that had ended trains nothing and writes nothing."""
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
            run_loop = _loop(run, hooks, signals, log)
            log(f"matrix products: {run.products} ({run.products_why})")
            fresh = replicate(create_train_state(run.cfg, opts.precision,
                                                 total_steps=run.clock.total_steps,
                                                 products=run.products), run.mesh)
            position = loop.start(run_loop, checkpoints, fresh, opts.resume, _warn)
            kept = _summary_of_ended_run(run, position)
            resumed_at = position.steps_taken(run.clock) if opts.resume else None
            with MetricsWriter(folder.path, resumed_at,  # an ended run is left as it is
                               enabled=primary and opts.metrics and kept is None) as writer:
                run_loop = dataclasses.replace(run_loop, writer=writer)
                if primary and kept is None:  # only now: a refused resume has changed nothing
                    _write_run_files(run, position, hooks)
                barrier("written")
                stop = loop.run_epochs(run_loop, position, folder, checkpoints, began)
        finally:
            checkpoints.close()
        if not stop.ended:  # stopped on request: --resume continues
            return RunResult(stop, None)
        summary = kept if kept is not None else _summary(run, position.history,
                                                         position.wall_time_s)
        if primary and kept is None:
            folder.write_summary(summary)
    log(f"{run.cfg.name}: best val_ppl={summary['best_val_ppl']:.2f} at epoch "
        f"{summary['best_epoch']} ({folder})")
    return RunResult(stop, summary)


def _loop(run: PreparedRun, hooks: Sequence[EpochHook], signals: StopSignals,
          log: Callable[[str], None]) -> loop.Loop:
    """The run's loop, its tokens placed on the run's devices (no metrics writer yet)."""
    opts = run.opts
    minutes = opts.checkpoint_minutes
    return loop.Loop(cfg=run.cfg, mesh=run.mesh, clock=run.clock, hooks=tuple(hooks),
                     data=dataclasses.replace(run.data,
                                              tokens=replicate(run.data.tokens, run.mesh)),
                     steps_per_chunk=opts.steps_per_chunk, stop_at_step=opts.stop_at_step,
                     checkpoint_every=opts.checkpoint_every,
                     checkpoint_seconds=None if minutes is None else 60 * minutes,
                     show_progress=opts.progress, signals=signals, log=log,
                     log_every=opts.log_every)


def _summary_of_ended_run(run: PreparedRun, position: loop.Position) -> dict[str, Any] | None:
    """The summary of a run that had ended before this resume, kept as it is: its config,
    wall time and versions are the training's, not this session's. None when epochs are left,
    or when the summary is missing or unreadable (then it is written anew)."""
    if position.progress is not None or not loop.protocol_ended(run.cfg, position.history,
                                                                 run.clock.epochs):
        return None
    try:
        return run.folder.read_summary()
    except UserError:
        return None


def _write_run_files(run: PreparedRun, position: loop.Position,
                     hooks: Sequence[EpochHook]) -> None:
    """config.json (the run's record), tokenizer.json, and the restored per-epoch files if any."""
    folder = run.folder
    if not run.opts.resume:  # a resumed run keeps the tokenizer it was trained with
        folder.write_tokenizer(run.data.tokenizer)
    folder.write_record(run.cfg, run.settings)
    # The restored rows (after a fallback to an older checkpoint, the later rows are gone).
    loop.write_epoch_files(folder, position, hooks)


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
        "train_windows": run.clock.train_windows,  # with train_stride > 1, those of a pass
        "val_windows": run.data.splits.num_val,
        "max_steps_per_epoch": run.opts.max_steps_per_epoch,
        "precision": compute_dtype_name(run.opts.precision),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu": cpu_name(),
        "devices": int(run.mesh.devices.size),
        "versions": package_versions(),
        "wall_time_s": wall,
    }

