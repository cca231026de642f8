"""A run folder's safety rules: checked before anything is written, locked while in use.

- A folder is continued (`--resume`) or replaced (`--overwrite`), never silently overwritten.
- A resume must match the run's config, step limit, precision and corpus, or it is refused.
- One run at a time: training holds an exclusive lock on `<run folder>/.lock` (a flock, which the
  kernel drops when the process ends, however it ends).
- Text files are written to a temporary name and renamed, so a crash or a full disk never leaves
  one half-written.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from tinylm_jax.checkpoint import read_run_record
from tinylm_jax.config import ExperimentConfig, UserError

LOCK_NAME = ".lock"
# Fields that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = ("name", "num_epochs", "early_stop_patience")
# How config.json's run settings are named to the user.
SETTING_FLAGS = {"precision": "--precision", "max_steps_per_epoch": "--max-steps-per-epoch",
                 "compute_dtype": "compute dtype"}


def _used(folder: Path) -> bool:
    return folder.is_dir() and any(path.name != LOCK_NAME for path in folder.iterdir())


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder the run may not use; writes nothing."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"{out}: nothing to resume (no run folder there)")
    elif _used(out) and not overwrite:
        raise UserError(f"{out}: run folder exists; pass --resume to continue it or "
                        "--overwrite to replace it")
    elif _used(out):
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


def check_resumable(out: Path, cfg: ExperimentConfig, settings: dict[str, Any]) -> None:
    """Refuse to resume `out` with another config or other `settings` (config.json's keys)."""
    stored, record = read_run_record(out)
    old, new = stored.to_dict(), cfg.to_dict()
    changed = [f"{key} ({old[key]!r} -> {new[key]!r})" for key in old
               if key not in RESUMABLE_CHANGES and old[key] != new[key]]
    for key, value in settings.items():
        if key == "corpus_sha256" and record.get(key) != value:
            changed.append("corpus (its sha256 differs)")
        elif record.get(key) != value:
            name = SETTING_FLAGS.get(key, key)
            changed.append(f"{name} ({record.get(key)!r} -> {value!r})")
    if changed:
        raise UserError(f"{out}: cannot resume with a different config: {', '.join(changed)}")


class RunFolderLock:
    """Exclusive use of a run folder while training (creates the folder)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file: IO[str] | None = None

    def __enter__(self) -> RunFolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = (self.folder / LOCK_NAME).open("a+", encoding="utf-8")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise UserError(f"{self.folder}: another run is using this run folder (pid "
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


def clear_run_folder(folder: Path) -> None:
    """Empty a run folder for `--overwrite`, keeping the lock that guards it."""
    for path in folder.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_csv_atomic(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """`rows` as a CSV with a header of `fields`, written whole or not at all."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a temporary file, then a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a temporary file, then a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
