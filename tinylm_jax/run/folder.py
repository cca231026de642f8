"""The run folder: every file training writes, its one writer and its one reader, and the
folder's safety rules.

A run folder holds:
  config.json              the experiment config and the run's settings (precision, step limit,
                           corpus sha256): what a resume must match
  tokenizer.json           the BPE the run was trained with
  history.csv              one row per finished epoch (`HISTORY_FIELDS`, and those of
                           `OPTIONAL_HISTORY_FIELDS` its rows have)
  metrics.csv, tensorboard/  the metrics a viewer reads, every few steps (`run.metrics_writer`)
  model.safetensors        a published model's weights (`run.published`), in a folder that has
                           the files above but no checkpoints
  <hook>.csv               each epoch hook's rows (`run.loop.EpochHook`), e.g. the attention
                           statistics from initialisation on (attention_by_epoch.csv)
  summary.json             written when the run ends
  checkpoints/             orbax checkpoints (`checkpoint.RunCheckpoints`)
  corrupt_checkpoints/     damaged checkpoints, set aside, never deleted
  .lock                    held while a run trains in the folder
The analyses write their own files beside these (`analysis.reports` owns those). A set of runs
that differ only in the random seed (`--seeds`) is a folder of run folders named `seed-N`.

Safety rules:
- A folder is continued (`--resume`) or replaced (`--overwrite`), never silently overwritten.
- A resume must match the run's config, step limit, precision and corpus, or it is refused.
- One run at a time: training holds an exclusive lock on `.lock` (a flock, which the kernel
  drops when the process ends, however it ends).
- Every file is written to a temporary name and renamed (`core.files`).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any

from tokenizers import Tokenizer

from tinylm_jax.core.config import ExperimentConfig, UserError, config_from_dict
from tinylm_jax.core.files import write_csv_atomic, write_text_atomic

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_ppl", "lr", "epoch_seconds",
                  "train_tokens_per_s")
# Columns history.csv has since runs count steps (the steps taken at the epoch's end; its
# validation pass's seconds): written when the rows have them, so that the folders of earlier
# runs (results/) still read. A row without one (an epoch an earlier version trained, in a
# resumed run) has an empty cell, and its dict has no such key. Any other column is refused.
OPTIONAL_HISTORY_FIELDS = ("step", "val_seconds")
# What every summary.json holds; a summary without one of these is unreadable.
SUMMARY_FIELDS = ("experiment", "best_val_ppl", "best_val_loss", "best_epoch", "epochs_run",
                  "stopped_early", "param_count", "num_tokens", "train_windows", "val_windows",
                  "max_steps_per_epoch", "precision", "backend", "device_kind", "devices",
                  "versions", "wall_time_s")
# What summaries hold since this version (the CPU's model: jax's device_kind says only "cpu"):
# written by every run, not required of the summaries of earlier runs.
OPTIONAL_SUMMARY_FIELDS = ("cpu",)
# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = ("name", "num_epochs", "early_stop_patience")
# How config.json's run settings are named to the user.
SETTING_FLAGS = {"precision": "--precision", "max_steps_per_epoch": "--max-steps-per-epoch",
                 "compute_dtype": "compute dtype", "products": "--products"}
# What a setting was before config.json recorded it.
SETTING_DEFAULTS = {"products": "xla"}


def seed_member(root: Path, seed: int) -> Path:
    """The run folder of random seed `seed` in the set of runs at `root` (`--seeds`)."""
    return root / f"seed-{seed}"


def seed_members(root: Path) -> list[tuple[int, Path]]:
    """The members of the set of runs at `root`, (seed, run folder), in seed order."""
    members = [(int(number[1]), path) for path in root.glob("seed-*")
               if path.is_dir() and (number := re.fullmatch(r"seed-(\d+)", path.name, re.ASCII))]
    return sorted(members)


class RunFolder:
    """One run folder, at `path`; whether it exists yet or not."""

    CONFIG = "config.json"
    TOKENIZER = "tokenizer.json"
    HISTORY = "history.csv"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"
    MODEL = "model.safetensors"  # a published model's weights, in place of checkpoints/
    CORRUPT = "corrupt_checkpoints"
    LOCK = ".lock"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def corrupt_checkpoints(self) -> Path:
        return self.path / self.CORRUPT

    # --- readers ---------------------------------------------------------------------------

    def read_record(self) -> tuple[ExperimentConfig, dict[str, Any]]:
        """config.json: the experiment config, and the whole record beside it."""
        path = self.file(self.CONFIG)
        if not path.is_file():
            raise UserError(f"{self.path}: not a run folder (no {self.CONFIG})")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            values = record["experiment"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: unreadable run config ({err!r})") from None
        return config_from_dict(values, source=str(path)), record

    def recorded(self, setting: str) -> Any:
        """A run setting of config.json, or what it was before config.json recorded it."""
        return _setting(self.read_record()[1], setting)

    def read_config(self) -> ExperimentConfig:
        return self.read_record()[0]

    def read_tokenizer(self) -> Tokenizer:
        path = self.file(self.TOKENIZER)
        if not path.is_file():
            raise UserError(f"{self.path}: run folder has no {self.TOKENIZER}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"{path}: unreadable tokenizer ({err})") from None

    def read_history(self) -> list[dict[str, float]]:
        """history.csv as rows of numbers (epoch and step as ints); the optional fields only
        where the file has them (`OPTIONAL_HISTORY_FIELDS`)."""
        if not self.has_history():
            raise UserError(f"{self.path}: no {self.HISTORY} (has the run finished an epoch?)")
        return _read_epoch_rows(self.file(self.HISTORY), HISTORY_FIELDS, "history",
                                optional=OPTIONAL_HISTORY_FIELDS)

    def read_rows(self, name: str, fields: tuple[str, ...], text_fields: tuple[str, ...] = ()
                  ) -> list[dict[str, Any]]:
        """An epoch hook's `<name>.csv`: `text_fields` as written, epoch as int, the rest as
        floats."""
        path = self.file(f"{name}.csv")
        if not path.is_file():
            raise UserError(f"{self.path}: no {path.name} (the run did not record {name})")
        return _read_epoch_rows(path, fields, name, text_fields)

    def has_history(self) -> bool:
        return self.file(self.HISTORY).is_file()

    def has_summary(self) -> bool:
        return self.file(self.SUMMARY).is_file()

    def read_summary(self) -> dict[str, Any]:
        """summary.json, which only a finished run has, with every one of `SUMMARY_FIELDS`."""
        if not self.has_summary():
            raise UserError(f"{self.path}: no {self.SUMMARY} (the run has not finished)")
        path = self.file(self.SUMMARY)
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise UserError(f"{path}: unreadable summary ({err})") from None
        if not isinstance(summary, dict):
            raise UserError(f"{path}: unreadable summary (not a JSON object)")
        if missing := [field for field in SUMMARY_FIELDS if field not in summary]:
            raise UserError(f"{path}: unreadable summary (no {', '.join(missing)})")
        return summary

    # --- writers ---------------------------------------------------------------------------

    def write_record(self, cfg: ExperimentConfig, settings: dict[str, Any]) -> None:
        """config.json: `cfg` and the run's `settings` (what a resume must match)."""
        self._write_json(self.CONFIG, {"experiment": cfg.to_dict(), **settings})

    def write_tokenizer(self, tokenizer: Tokenizer) -> None:
        write_text_atomic(self.file(self.TOKENIZER), tokenizer.to_str(pretty=True))

    def write_history(self, history: list[dict[str, Any]]) -> None:
        """history.csv: `HISTORY_FIELDS`, then the optional ones that any row has."""
        optional = tuple(field for field in OPTIONAL_HISTORY_FIELDS
                         if any(field in row for row in history))
        write_csv_atomic(self.file(self.HISTORY), HISTORY_FIELDS + optional, history)

    def write_rows(self, name: str, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
        """An epoch hook's rows, as `<name>.csv` with columns `fields`."""
        write_csv_atomic(self.file(f"{name}.csv"), fields, rows)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write_json(self.SUMMARY, summary)

    def _write_json(self, name: str, value: dict[str, Any]) -> None:
        write_text_atomic(self.file(name), json.dumps(value, indent=2) + "\n")

    # --- safety rules ----------------------------------------------------------------------

    def check_usable(self, resume: bool, overwrite: bool) -> None:
        """Refuse a folder the run may not use; writes nothing."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
        if resume:
            if not self.file(self.CONFIG).is_file():
                raise UserError(f"{out}: nothing to resume (no run folder there)")
        elif self._used() and not overwrite:
            raise UserError(f"{out}: run folder exists; pass --resume to continue it or "
                            "--overwrite to replace it")
        elif self._used():
            self.read_record()  # only a readable run folder may be overwritten
        existing = out
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not _writable(existing):
            raise UserError(f"{existing}: output folder is not writable")

    def check_resumable(self, cfg: ExperimentConfig, settings: dict[str, Any]) -> None:
        """Refuse to resume with another config or other `settings` (config.json's keys)."""
        stored, record = self.read_record()
        old, new = stored.to_dict(), cfg.to_dict()
        # A per-step schedule's length is the protocol's: its epochs may not change either; nor
        # may a step-based protocol's, whose epochs' steps follow from its budget.
        epochs_free = cfg.schedule == "plateau" and not any(
            config.max_steps or config.eval_every for config in (stored, cfg))
        free = RESUMABLE_CHANGES if epochs_free else ("name", "early_stop_patience")
        changed = [f"{key} ({old[key]!r} -> {new[key]!r})" for key in old
                   if key not in free and old[key] != new[key]]
        for key, value in settings.items():
            before = _setting(record, key)
            if key == "corpus_sha256" and before != value:
                changed.append("corpus (its sha256 differs)")
            elif before != value:
                name = SETTING_FLAGS.get(key, key)
                changed.append(f"{name} ({before!r} -> {value!r})")
        if changed:
            raise UserError(f"{self.path}: cannot resume with a different config: "
                            f"{', '.join(changed)}")

    def lock(self) -> RunFolderLock:
        """Exclusive use of the folder while training (creates it)."""
        return RunFolderLock(self.path / self.LOCK)

    def clear(self) -> None:
        """Empty the folder for `--overwrite`, keeping the lock that guards it."""
        for path in self.path.iterdir():
            if path.name == self.LOCK:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _used(self) -> bool:
        return self.path.is_dir() and any(p.name != self.LOCK for p in self.path.iterdir())


def _setting(record: dict[str, Any], key: str) -> Any:
    return record.get(key, SETTING_DEFAULTS.get(key))


def _writable(folder: Path) -> bool:
    try:
        probe = folder / f".tinylm_write_probe_{os.getpid()}"  # one per process
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def _read_epoch_rows(path: Path, fields: tuple[str, ...], what: str,
                     text_fields: tuple[str, ...] = (), optional: tuple[str, ...] | None = None
                     ) -> list[dict[str, Any]]:
    """A per-epoch CSV's rows: `text_fields` as written, epoch as int, the rest as floats.
    With `optional` (history.csv), the file may have those columns too (an optional step as
    int), and no others: an empty cell of one is left out of its row. Without it, a file's other
    columns are ignored."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            extra = _unknown_columns(reader.fieldnames or [], fields, optional)
            rows = [{key: row[key] if key in text_fields else float(row[key]) for key in fields}
                    | {key: float(row[key]) for key in optional or () if row.get(key)}
                    for row in reader]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: unreadable {what} ({err!r})") from None
    if extra:
        raise UserError(f"{path}: unreadable {what} (unknown column {', '.join(extra)})")
    if not rows:
        raise UserError(f"{path}: no epochs recorded")
    for row in rows:
        row["epoch"] = int(row["epoch"])
        if "step" in row and "step" in (optional or ()):
            row["step"] = int(row["step"])
    return rows


def _unknown_columns(header: list[str], fields: tuple[str, ...],
                     optional: tuple[str, ...] | None) -> list[str]:
    """The columns of `header` that are neither `fields` nor `optional` (none when `optional`
    is None: such a file's other columns are ignored)."""
    if optional is None:
        return []
    return [column for column in header if column not in fields + optional]


class RunFolderLock:
    """An exclusive flock on a run folder's lock file, naming its holder's pid."""

    def __init__(self, path: Path):
        self.path = path
        self._file: IO[str] | None = None

    def __enter__(self) -> RunFolderLock:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        lock = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise UserError(f"{folder}: another run is using this run folder (pid "
                            f"{holder}); wait for it to end or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._file = lock
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
