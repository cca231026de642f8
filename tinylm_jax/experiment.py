"""One experiment end to end: data, run folder, epochs with early stopping, checkpoints, summary.

A run folder holds `config.json`, `tokenizer.json`, `history.csv` (one row per epoch),
`summary.json` and `checkpoints/`. Every check of the user's input happens before anything is
written or trained; an existing folder is continued (`resume`) or replaced (`overwrite`), never
silently overwritten.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tinylm_jax.checkpoint import RunCheckpoints, read_run_record, read_run_tokenizer
from tinylm_jax.config import EXPERIMENT_NAMES, ExperimentConfig, UserError, load_config
from tinylm_jax.data import Dataset, build_dataset, file_sha256, read_corpus, resolve_corpus
from tinylm_jax.model import build_model, count_params, init_params
from tinylm_jax.parallel import barrier, check_batch_fits, data_mesh, is_primary, replicate
from tinylm_jax.train import compute_dtype, create_train_state, evaluate, train_epoch

# The seed report's Table 1: best validation perplexity and the epoch it was reached.
SEED_TABLE1 = {"baseline": (60.00, 6), "medium": (63.24, 5), "wider": (58.35, 10)}
HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_ppl", "lr", "epoch_seconds",
                  "train_tokens_per_s")
# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = ("name", "num_epochs", "early_stop_patience")


class TrainingDiverged(Exception):
    """A non-finite loss: the run stops without checkpointing the broken state."""


@dataclass(frozen=True)
class RunOptions:
    out_dir: Path  # the run folder
    data: str | None = None  # corpus path; None means $TINYLM_DATA, then the download cache
    precision: str = "auto"  # auto | bf16 | fp32 compute
    max_steps_per_epoch: int | None = None  # cut epochs short, for quick runs
    resume: bool = False  # continue the run folder's latest checkpoint
    overwrite: bool = False  # replace an existing run folder
    progress: bool = True  # show a progress bar per epoch
    steps_per_chunk: int | None = None  # steps per compiled call; None: the backend's default
    devices: int | None = None  # split batches over the first N devices; None: all of them


@dataclass(frozen=True)
class PreparedRun:
    cfg: ExperimentConfig
    opts: RunOptions
    corpus: Path
    corpus_sha256: str
    data: Dataset
    param_count: int
    mesh: Mesh  # the devices training splits each batch over


def _check_run_folder(opts: RunOptions) -> None:
    out = opts.out_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    used = out.is_dir() and any(out.iterdir())
    if opts.resume:
        if not (out / "config.json").is_file():
            raise UserError(f"{out}: nothing to resume (no run folder there)")
    elif used and not opts.overwrite:
        raise UserError(f"{out}: run folder exists; pass --resume to continue it or "
                        "--overwrite to replace it")
    elif used:
        read_run_record(out)  # only a readable run folder may be overwritten
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _writable(existing):
        raise UserError(f"{existing}: output folder is not writable")


def _writable(folder: Path) -> bool:
    try:
        probe = folder / f".tinylm_write_probe_{os.getpid()}"  # one per process
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def _check_resumable(opts: RunOptions, cfg: ExperimentConfig, corpus_sha256: str) -> None:
    stored, record = read_run_record(opts.out_dir)
    old, new = stored.to_dict(), cfg.to_dict()
    changed = [f"{k} ({old[k]!r} -> {new[k]!r})" for k in old
               if k not in RESUMABLE_CHANGES and old[k] != new[k]]
    if record.get("max_steps_per_epoch") != opts.max_steps_per_epoch:
        changed.append(f"--max-steps-per-epoch ({record.get('max_steps_per_epoch')} -> "
                       f"{opts.max_steps_per_epoch})")
    if record.get("corpus_sha256") != corpus_sha256:
        changed.append("corpus (its sha256 differs)")
    if changed:
        raise UserError(f"{opts.out_dir}: cannot resume with a different config: "
                        f"{', '.join(changed)}")


def prepare(cfg: ExperimentConfig, opts: RunOptions, dry_run: bool = False) -> PreparedRun:
    """Validate everything and load the data; writes nothing. A dry run ignores the run folder."""
    compute_dtype(opts.precision)
    mesh = data_mesh(opts.devices)
    check_batch_fits(cfg.batch_size, mesh)
    for flag, value in (("--max-steps-per-epoch", opts.max_steps_per_epoch),
                        ("--steps-per-chunk", opts.steps_per_chunk)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be positive, got {value}")
    if not dry_run:
        _check_run_folder(opts)
    corpus = resolve_corpus(opts.data)
    text = read_corpus(corpus)
    corpus_sha256 = file_sha256(corpus)
    tokenizer = None
    if opts.resume and not dry_run:
        _check_resumable(opts, cfg, corpus_sha256)
        tokenizer = read_run_tokenizer(opts.out_dir)
    data = build_dataset(text, cfg, tokenizer)
    params = jax.eval_shape(lambda: init_params(build_model(cfg), cfg.seed))
    return PreparedRun(cfg, opts, corpus, corpus_sha256, data, count_params(params), mesh)


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
              f"precision: {run.opts.precision} ({np.dtype(compute_dtype(run.opts.precision))} "
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


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)


def package_versions(*extra: str) -> dict[str, str]:
    """Installed versions of the packages a run's numbers depend on, and of `extra` ones."""
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tokenizers", "numpy", *extra)
    return {name: importlib.metadata.version(name) for name in names}


def train_prepared(run: PreparedRun, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a prepared run to its end (epoch limit or early stop); returns the summary."""
    cfg, opts, out = run.cfg, run.opts, run.opts.out_dir
    primary = is_primary()  # with several processes, one writes the files; all checkpoint
    log = log if primary else (lambda _: None)
    barrier("checked")  # every process has read the run folder before it changes
    if primary and opts.overwrite and not opts.resume and out.exists():
        shutil.rmtree(out)
    began = time.perf_counter()
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        config_record = {"experiment": cfg.to_dict(), "precision": opts.precision,
                         "max_steps_per_epoch": opts.max_steps_per_epoch,
                         "corpus_sha256": run.corpus_sha256}
        (out / "config.json").write_text(json.dumps(config_record, indent=2) + "\n",
                                         encoding="utf-8")
        run.data.tokenizer.save(str(out / "tokenizer.json"))
    barrier("written")

    state = replicate(create_train_state(cfg, opts.precision), run.mesh)
    data = dataclasses.replace(run.data, tokens=replicate(run.data.tokens, run.mesh))
    checkpoints = RunCheckpoints(out)
    history: list[dict[str, Any]] = []
    earlier_seconds = 0.0
    latest = checkpoints.latest_epoch() if opts.resume else None
    if latest is not None:
        state, record = checkpoints.restore(latest, state)
        history, earlier_seconds = record["history"], record["wall_time_s"]
        log(f"resumed {out} after epoch {latest}")
    try:
        for epoch in range(len(history) + 1, cfg.num_epochs + 1):
            if should_stop(history, cfg):
                break
            lr = state.learning_rate
            state, train_metrics = train_epoch(state, data, cfg, epoch,
                                               opts.max_steps_per_epoch, opts.progress,
                                               opts.steps_per_chunk, run.mesh)
            val_loss = evaluate(state, data, cfg, opts.steps_per_chunk, run.mesh)
            if not (math.isfinite(train_metrics["train_loss"]) and math.isfinite(val_loss)):
                raise TrainingDiverged(f"epoch {epoch}: non-finite loss (train "
                                       f"{train_metrics['train_loss']}, val {val_loss}); "
                                       "stopped without saving it")
            state = state.step_plateau(val_loss)
            history.append({"epoch": epoch, "train_loss": train_metrics["train_loss"],
                            "val_loss": val_loss, "val_ppl": perplexity(val_loss), "lr": lr,
                            "epoch_seconds": train_metrics["epoch_seconds"],
                            "train_tokens_per_s": train_metrics["train_tokens_per_s"]})
            wall = earlier_seconds + time.perf_counter() - began
            checkpoints.save(epoch, state, {"history": history, "wall_time_s": wall}, val_loss)
            if primary:
                _write_history(out / "history.csv", history)
            row = history[-1]
            note = "new best" if best_epoch(history) == epoch else "no improvement"
            log(f"epoch {epoch}/{cfg.num_epochs}: train_loss={row['train_loss']:.4f} "
                f"val_loss={val_loss:.4f} val_ppl={row['val_ppl']:.2f} lr={lr:.2e} "
                f"{row['epoch_seconds']:.1f}s {row['train_tokens_per_s']:,.0f} tok/s ({note})")
    finally:
        checkpoints.close()
    summary = _summary(run, history, earlier_seconds + time.perf_counter() - began)
    if primary:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n",
                                          encoding="utf-8")
    log(f"{cfg.name}: best val_ppl={summary['best_val_ppl']:.2f} at epoch "
        f"{summary['best_epoch']} ({out})")
    return summary


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
        "precision": str(np.dtype(compute_dtype(run.opts.precision))),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": int(run.mesh.devices.size),
        "versions": package_versions(),
        "wall_time_s": wall,
    }


def run_experiment(cfg: ExperimentConfig, opts: RunOptions,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    return train_prepared(prepare(cfg, opts), log)


def seed_result(key: str, experiment: str) -> tuple[float, int] | None:
    """The seed's (best PPL, epoch) for a run keyed `key` (baseline, medium, wider) or named
    like one of the seed's experiments; None for anything else."""
    if key in SEED_TABLE1:
        return SEED_TABLE1[key]
    names = {load_config(name).name: name for name in EXPERIMENT_NAMES}
    return SEED_TABLE1.get(names.get(experiment, ""))


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
