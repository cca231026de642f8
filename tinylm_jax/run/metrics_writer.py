"""The run's metrics, as a viewer reads them: `metrics.csv` and TensorBoard event files in the
run folder, written while the run trains (`tensorboard --logdir runs/` shows it live).

  metrics.csv    long format, `step,name,value`, one row per scalar: a new metric never
                 changes the columns; `MetricsWriter` is its one writer, `read_metrics` its
                 one reader
  tensorboard/   TensorBoard event files, one per session of the run (a resume starts another)

The event files are written with tensorboardX's record writer and protos, synchronously, on the
caller's thread. Its `SummaryWriter` writes on a background thread instead: there a full disk
prints a traceback from that thread, which then dies, and once its queue of 10 events is full
every later `add_scalar` blocks for ever; and its `flush()` does not wait for the queue. Here a
write that fails raises one `UserError` line in the training loop, and `flush()` means written.

A resumed run continues from its checkpoint's step k: the rows that the interrupted session
wrote after step k are dropped from metrics.csv, and the new event file starts with
TensorBoard's purge marker, a `SessionLog.START` at step k + 1 (what tensorboardX's
`SummaryWriter(purge_step=k + 1)` writes), so that TensorBoard hides the events at steps after k
of the earlier files. Both keep step k itself, which the checkpoint includes. Every session's
file starts with that marker, a new run's at step 0: TensorBoard's Python reader
(`tensorboard --load_fast=false`, and where its Rust data server is missing) takes a run's first
`START` for the start, not a restart, and purges only at the later ones.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import IO, Any

from tinylm_jax.core.config import UserError
from tinylm_jax.core.files import disk_full, write_csv_atomic

METRICS_CSV = "metrics.csv"
TENSORBOARD = "tensorboard"
CSV_FIELDS = ("step", "name", "value")


class MetricsWriter:
    """Writes a run's scalars to `<run_dir>/metrics.csv` and `<run_dir>/tensorboard/`.

    `resume_step`: the optimiser step a resumed run continues from (module docstring); None for
    a new run, whose metrics.csv starts empty. `enabled=False` (the processes other than the
    first) writes nothing, and creates no file.
    """

    # Between the loop's own flushes (at each checkpoint), the first `scalars` this many seconds
    # after the last flush flushes, so that a viewer shows the run live. (No timer thread: a
    # write that fails must fail in the caller's thread.)
    FLUSH_SECONDS = 10.0

    def __init__(self, run_dir: Path, resume_step: int | None = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.csv_path = self.run_dir / METRICS_CSV
        self.enabled = enabled
        self._pending: list[tuple[int, str, float]] = []
        self._csv: IO[str] | None = None
        self._events: Any = None  # tensorboardX.RecordWriter, once opened
        self._events_path = self.run_dir / TENSORBOARD
        self._last_flush = time.monotonic()
        if enabled:
            self._open(resume_step)

    def _open(self, resume_step: int | None) -> None:
        """Open both files; on a resume, first drop the rows after `resume_step`."""
        tbx = _tensorboardx()
        with self._failing(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._failing(self.csv_path):
            kept = [] if resume_step is None else [
                {"step": step, "name": name, "value": value}
                for step, name, value in _csv_rows(self.csv_path, missing_ok=True)
                if int(step) <= resume_step]
            write_csv_atomic(self.csv_path, CSV_FIELDS, kept)
            self._csv = self.csv_path.open("a", newline="", encoding="utf-8")
        with self._failing(self._events_path):
            self._events_path.mkdir(parents=True, exist_ok=True)
            self._events_path = self._events_path / _event_file_name()
            self._events = tbx.RecordWriter(str(self._events_path))
            self._write_event(tbx.Event(wall_time=time.time(), file_version="brain.Event:2"))
            start = tbx.SessionLog(status=tbx.SessionLog.START)
            self._write_event(tbx.Event(wall_time=time.time(), session_log=start,
                                        step=0 if resume_step is None else resume_step + 1))
            self._events.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record `values` (metric name -> value) at optimiser step `step`: one CSV row each,
        and one TensorBoard event holding them all."""
        if not self.enabled or not values:
            return
        tbx = _tensorboardx()
        step = int(step)
        values = {name: float(value) for name, value in values.items()}
        self._pending += [(step, name, value) for name, value in values.items()]
        summary = tbx.Summary(value=[tbx.scalar(name, value).value[0]
                                     for name, value in values.items()])
        with self._failing(self._events_path):
            self._write_event(tbx.Event(wall_time=time.time(), step=step, summary=summary))
        if time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Put every scalar given so far on disk (appended to metrics.csv, and the event file's
        buffer written and synced); raises a one-line `UserError` if the disk refuses them."""
        if self._csv is None:
            return
        self._last_flush = time.monotonic()
        text = io.StringIO(newline="")
        csv.writer(text).writerows((step, name, repr(value))
                                   for step, name, value in self._pending)
        self._pending = []
        with self._failing(self.csv_path):
            self._csv.write(text.getvalue())
            self._csv.flush()
            os.fsync(self._csv.fileno())
        with self._failing(self._events_path):
            self._events.flush()

    def close(self) -> None:
        """Flush and close; after a failed write, only close, quietly (the failure was said)."""
        try:
            self.flush()
        finally:
            self._abandon()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
            return
        try:  # the metrics up to a failure (a diverging loss) are worth keeping; but the run's
            self.close()  # own error is the one to report, not a second one of ours
        except UserError:
            pass

    def _write_event(self, event: Any) -> None:
        self._events.write(event.SerializeToString())

    def _abandon(self) -> None:
        """Close both files without writing more; a buffer the disk refuses is dropped."""
        self.enabled = False
        self._pending = []
        for handle in (self._csv, self._events):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass
        self._csv = self._events = None

    @contextmanager
    def _failing(self, path: Path) -> Iterator[None]:
        """A write to `path` that fails ends the writer, as one `UserError` line."""
        try:
            yield
        except OSError as err:
            self._abandon()
            raise UserError(_write_error(path, err)) from None


@functools.cache
def _tensorboardx() -> SimpleNamespace:
    """The pieces of tensorboardX used here, imported on first use: importing tensorboardX
    imports torch where torch is installed (seconds), which a process that writes no metrics
    (`enabled=False`, or only importing this module) need not pay."""
    from tensorboardX import RecordWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import scalar

    return SimpleNamespace(RecordWriter=RecordWriter, Event=Event, SessionLog=SessionLog,
                           Summary=Summary, scalar=scalar)


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv as {name: [(step, value), ...]}, in the order written. A last row without
    its line end is one being written (the run is live), and is left out."""
    rows = _csv_rows(Path(run_dir) / METRICS_CSV, missing_ok=False)
    metrics: dict[str, list[tuple[int, float]]] = {}
    for step, name, value in rows:
        metrics.setdefault(name, []).append((int(step), float(value)))
    return metrics


def _csv_rows(path: Path, missing_ok: bool) -> list[tuple[str, str, str]]:
    """metrics.csv's complete rows as text, each checked to be a step and a number."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return []
        raise UserError(f"{path.parent}: no {path.name} (the run wrote no metrics)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable metrics ({err})") from None
    lines = csv.reader(io.StringIO(text[:text.rfind("\n") + 1], newline=""))
    if next(lines, None) != list(CSV_FIELDS):
        raise UserError(f"{path}: unreadable metrics (the first line is not "
                        f"{','.join(CSV_FIELDS)})")
    rows = []
    for number, row in enumerate(lines, start=2):
        try:
            step, name, value = row
            int(step), float(value)
        except ValueError:
            raise UserError(f"{path}: unreadable metrics (line {number}: "
                            f"{','.join(row)!r})") from None
        rows.append((step, name, value))
    return rows


def _event_file_name() -> str:
    """A new event file's name: "tfevents" marks it for TensorBoard, which reads a folder's
    files in the order of their names; nanoseconds, so that a resume within the same second
    neither overwrites the earlier file nor sorts before it."""
    return f"events.out.tfevents.{time.time_ns()}.{socket.gethostname()}.{os.getpid()}"


def _write_error(path: Path, err: OSError) -> str:
    """The one line a failed metrics write is reported as."""
    if disk_full(err):
        return f"{path}: the disk is full; metrics not written: free some space, then --resume"
    reason = err.strerror or str(err)
    return f"{path}: cannot be written ({reason}); metrics not written"
