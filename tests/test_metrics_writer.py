"""The metrics writer (`run.metrics_writer`): its scalars read back as a user's viewer reads them
(TensorBoard's own reader, a real `tensorboard` server's HTTP API, and `read_metrics`), a resume
that hides what the interrupted session wrote after its checkpoint, and a full disk or an
unwritable folder as one line. Also history.csv with and without its optional columns."""

import csv
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tinylm_jax.core.config import UserError
from tinylm_jax.run.folder import HISTORY_FIELDS, OPTIONAL_HISTORY_FIELDS, RunFolder
from tinylm_jax.run.metrics_writer import MetricsWriter, read_metrics

REPO = Path(__file__).resolve().parent.parent
TRAIN = {"train/loss": 4.0, "train/lr": 3e-4, "train/grad_norm": 0.8,
         "train/tokens_per_s": 20000.0}


def _train(step: int, session: int = 0) -> dict[str, float]:
    """A step's training scalars, distinct per step and per session."""
    return {**TRAIN, "train/loss": 4.0 - step / 100 + 10 * session}


def _write(run: Path, steps: range, resume_step: int | None = None, session: int = 0) -> None:
    with MetricsWriter(run, resume_step=resume_step) as writer:
        for step in steps:
            writer.scalars(step, _train(step, session))


def _tensorboard_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard's own reader loads the run's event files."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator").EventAccumulator
    events = accumulator(str(run / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_scalars_read_back_with_tensorboards_reader_and_read_metrics(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in (10, 20, 30):
            writer.scalars(step, _train(step))
        writer.scalars(30, {"eval/loss": 4.5, "eval/ppl": 90.0})
        writer.flush()  # flushed means readable, before the writer closes
        shown = _tensorboard_scalars(tmp_path, "train/loss")
        assert read_metrics(tmp_path)["eval/ppl"] == [(30, 90.0)]
    assert [step for step, _ in shown] == [10, 20, 30]
    assert [value for _, value in shown] == pytest.approx([3.9, 3.8, 3.7])  # float32 there
    metrics = read_metrics(tmp_path)
    assert list(metrics) == [*TRAIN, "eval/loss", "eval/ppl"]
    assert metrics["train/loss"] == [(10, 3.9), (20, 3.8), (30, 3.7)]  # exact here
    assert metrics["train/lr"] == [(10, 3e-4), (20, 3e-4), (30, 3e-4)]
    with (tmp_path / "metrics.csv").open(newline="") as f:
        assert next(csv.reader(f)) == ["step", "name", "value"]  # long: a new name adds rows


def test_a_resume_drops_the_rows_after_its_step_and_tensorboard_hides_them(tmp_path):
    _write(tmp_path, range(10, 60, 10))  # checkpointed at step 30, then ran on to step 50
    _write(tmp_path, range(40, 80, 10), resume_step=30, session=1)
    expected = [(10, 3.9), (20, 3.8), (30, 3.7), (40, 13.6), (50, 13.5), (60, 13.4),
                (70, 13.3)]
    assert read_metrics(tmp_path)["train/loss"] == expected
    assert read_metrics(tmp_path)["train/lr"] == [(step, 3e-4) for step, _ in expected]
    shown = _tensorboard_scalars(tmp_path, "train/loss")
    assert [step for step, _ in shown] == [step for step, _ in expected]  # once each
    assert [value for _, value in shown] == pytest.approx([value for _, value in expected])
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one file per session


def test_a_row_cut_short_is_left_out_and_dropped_at_the_resume(tmp_path):
    _write(tmp_path, range(10, 40, 10))
    with (tmp_path / "metrics.csv").open("a", newline="") as f:
        f.write("40,train/lo")  # killed in the middle of a write
    assert read_metrics(tmp_path)["train/loss"][-1] == (30, 3.7)
    _write(tmp_path, range(40, 50, 10), resume_step=30, session=1)
    assert read_metrics(tmp_path)["train/loss"] == [(10, 3.9), (20, 3.8), (30, 3.7),
                                                     (40, 13.6)]


def test_a_viewer_sees_the_rows_between_the_loops_flushes(tmp_path, monkeypatch):
    monkeypatch.setattr(MetricsWriter, "FLUSH_SECONDS", 0.0)
    with MetricsWriter(tmp_path) as writer:
        writer.scalars(1, {"train/loss": 2.0})
        writer.scalars(2, {"train/loss": 1.0})  # flushes what came before it
        assert read_metrics(tmp_path)["train/loss"][:1] == [(1, 2.0)]


def test_a_failing_run_keeps_its_metrics_and_its_own_error(tmp_path):
    with pytest.raises(ZeroDivisionError), MetricsWriter(tmp_path) as writer:
        writer.scalars(1, {"train/loss": float("inf")})
        1 / 0  # noqa: B018  (the run's own failure)
    assert read_metrics(tmp_path) == {"train/loss": [(1, float("inf"))]}


def test_a_disabled_writer_writes_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", enabled=False) as writer:
        writer.scalars(1, TRAIN)
        writer.flush()
    assert not (tmp_path / "run").exists()


def _one_line(err: pytest.ExceptionInfo, capfd: pytest.CaptureFixture) -> str:
    """The error's message, once nothing else was printed (no thread's traceback, no
    "Exception ignored" of a file closed by the garbage collector)."""
    gc.collect()
    out, printed = capfd.readouterr()
    assert out == printed == ""
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_full_disk_at_a_flush_is_one_line(tmp_path, monkeypatch, capfd):
    writer = MetricsWriter(tmp_path)
    writer.scalars(10, TRAIN)

    def full(fd: int) -> None:  # what a full disk's delayed allocation reports at the sync
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as err:
        writer.flush()
    writer.close()  # quiet: the failure was reported
    assert _one_line(err, capfd) == (f"{tmp_path / 'metrics.csv'}: the disk is full; metrics "
                                      "not written: free some space, then --resume")


def test_a_full_disk_when_a_resume_rewrites_the_csv_is_one_line(tmp_path, capfd):
    _write(tmp_path, range(10, 40, 10))
    (tmp_path / ".metrics.csv.tmp").symlink_to("/dev/full")  # the kernel's own ENOSPC
    with pytest.raises(UserError) as err:
        MetricsWriter(tmp_path, resume_step=20)
    assert "metrics.csv: the disk is full; metrics not written" in _one_line(err, capfd)
    assert read_metrics(tmp_path)["train/loss"][-1] == (30, 3.7)  # untouched


def test_an_unwritable_folder_is_one_line(capfd):
    with pytest.raises(UserError) as err:
        MetricsWriter(Path("/proc/tinylm-run"))
    assert _one_line(err, capfd) == ("/proc/tinylm-run: cannot be written (No such file or "
                                     "directory); metrics not written")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_a_read_only_folder_is_one_line(tmp_path, capfd):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UserError) as err:
            MetricsWriter(tmp_path)
    finally:
        tmp_path.chmod(0o700)
    assert "cannot be written (Permission denied); metrics not written" in _one_line(err,
                                                                                      capfd)


def test_read_metrics_names_what_is_missing_or_unreadable(tmp_path):
    with pytest.raises(UserError, match="no metrics.csv"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.csv").write_text("step,name,value\n1,train/loss,x\n2,a,1\n")
    with pytest.raises(UserError, match=r"unreadable metrics \(line 2: '1,train/loss,x'\)"):
        read_metrics(tmp_path)


# --- history.csv -------------------------------------------------------------------------------

ROW = {"epoch": 1, "train_loss": 4.5, "val_loss": 4.3, "val_ppl": 73.7, "lr": 3e-4,
       "epoch_seconds": 60.0, "train_tokens_per_s": 2e4}


def test_a_history_from_results_still_reads(tmp_path):
    shutil.copy(REPO / "results" / "baseline" / "history.csv", tmp_path / "history.csv")
    history = RunFolder(tmp_path).read_history()
    assert [row["epoch"] for row in history] == list(range(1, len(history) + 1))
    assert all(set(row) == set(HISTORY_FIELDS) for row in history)


def test_a_history_with_the_optional_columns_reads_back(tmp_path):
    folder = RunFolder(tmp_path)
    old = dict(ROW)  # an epoch an earlier version trained, in a resumed run
    new = {**ROW, "epoch": 2, "step": 1400, "val_seconds": 12.5}
    folder.write_history([old, new])
    with folder.file("history.csv").open() as f:
        assert next(csv.reader(f)) == [*HISTORY_FIELDS, *OPTIONAL_HISTORY_FIELDS]
    read_old, read_new = folder.read_history()
    assert read_old == old and read_new == new and isinstance(read_new["step"], int)
    folder.write_history([old])  # rows without them: the columns of earlier versions
    assert folder.file("history.csv").read_text().splitlines()[0] == ",".join(HISTORY_FIELDS)


def test_a_history_with_an_unknown_column_is_refused(tmp_path):
    lines = [",".join([*HISTORY_FIELDS, "step", "colour"]),
             ",".join([*(str(value) for value in ROW.values()), "700", "red"])]
    (tmp_path / "history.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"history.csv: unreadable history \(unknown column "
                                        r"colour\)$"):
        RunFolder(tmp_path).read_history()


# --- a real TensorBoard server ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.mark.parametrize("load_fast", ["auto", "false"])  # its Rust data server; its Python one
def test_a_tensorboard_server_shows_the_scalars(tmp_path, load_fast):
    """`tensorboard --logdir runs/` as a user starts it, read through its HTTP API: the steps
    of a resumed run, each once, with the values of the session that wrote it last."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "runs" / "tiny"
    _write(run, range(10, 60, 10))
    _write(run, range(40, 60, 10), resume_step=30, session=1)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs"),
         "--host", "127.0.0.1", "--port", str(port), f"--load_fast={load_fast}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline, tags = time.monotonic() + 20, {}
        while "train/loss" not in tags.get("tiny/tensorboard", {}):
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "tensorboard showed no scalars in 20 s"
            time.sleep(0.2)
            try:
                tags = _get(f"{base}/plugin/scalars/tags")
            except OSError:  # not listening yet
                pass
        query = urllib.parse.urlencode({"run": "tiny/tensorboard", "tag": "train/loss"})
        points = _get(f"{base}/plugin/scalars/scalars?{query}")
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # the server and its data server, if it started one
        server.wait()
        server.stdout.close()
    assert [step for _, step, _ in points] == [10, 20, 30, 40, 50]
    assert [value for *_, value in points] == pytest.approx([3.9, 3.8, 3.7, 13.6, 13.5])
