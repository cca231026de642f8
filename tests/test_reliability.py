"""Stopping and resuming: exact resume, signals, damaged checkpoints, full disks, locks, NaN.

Every run here is the tiny experiment cut to 6 steps per epoch, so a run takes seconds. "The same"
means bitwise: params, optimiser state, plateau state, step, and the history's numbers (all but
its timings).

Where each kind of resume is proven equal to a straight run, once:
- within an epoch, in one process: test_train (the cheapest level that can break it);
- across an epoch boundary, with the plateau state: test_cli;
- from a mid-epoch stop, across processes: the SIGTERM test below (stopped in one process by a
  real signal, resumed in a fresh one).
"""

import contextlib
import csv
import errno
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, TINY_CHARS, snapshot, tiny_toml_file

from tinylm_jax.analysis.attention_stats import AttentionRecord
from tinylm_jax.cli.run_experiment import main
from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.data import train_order
from tinylm_jax.core.train import TrainingDiverged, create_train_state
from tinylm_jax.run import loop
from tinylm_jax.run.checkpoint import RunCheckpoints, _QuietWhenDiskFull, _rank
from tinylm_jax.run.folder import RunFolder
from tinylm_jax.run.signals import StopSignals

STEPS = 6  # per epoch, via --max-steps-per-epoch
TIMINGS = ("epoch_seconds", "train_tokens_per_s", "val_seconds")
ATTENTION_CSV = f"{AttentionRecord.name}.csv"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus_text):
    """(folder, toml, corpus): three epochs of 6 steps, 4 steps per compiled chunk."""
    root = tmp_path_factory.mktemp("reliability")
    toml = tiny_toml_file(root / "tiny.toml", num_epochs=3)
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text[:TINY_CHARS], encoding="utf-8")
    return root, toml, corpus


def _flags(setup, out, *extra, toml=None, steps=STEPS):
    _, default_toml, corpus = setup
    return [str(toml or default_toml), "--data", str(corpus), "--out", str(out), "--no-progress",
            "--max-steps-per-epoch", str(steps), "--steps-per-chunk", "4", *extra]


def _run(setup, out, *extra, **options):
    return main(_flags(setup, out, *extra, **options))


def _script(setup, out, *extra):
    """The command in a process of its own (as a user runs it)."""
    return [sys.executable, str(REPO / "scripts" / "run_experiment.py"),
            *_flags(setup, out, *extra)]


def _restore(out, number):
    """(state, record) of checkpoint `number` (or "latest", "best") of a run folder, verified."""
    cfg = RunFolder(out).read_config()
    checkpoints = RunCheckpoints(RunFolder(out), read_only=True)
    try:
        if number == "latest":
            number = checkpoints.latest()
        elif number == "best":
            number = checkpoints.best()
        return checkpoints.restore(number, create_train_state(cfg, "fp32"))
    finally:
        checkpoints.close()


def _latest(out):
    return _restore(out, "latest")


def _leaves(state):
    return jax.tree.leaves((state.params, state.opt_state, state.plateau_state, state.step))


def _same_state(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def _numbers(record):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in record["history"]]


def _attention_lines(out):
    """attention_by_epoch.csv's lines: a resumed run's must be a straight run's, byte for byte."""
    return (out / ATTENTION_CSV).read_bytes().splitlines()


def _aside(out):
    """The names of the checkpoints set aside in `corrupt_checkpoints/`."""
    return [p.name for p in (out / RunFolder.CORRUPT).iterdir()]


@pytest.fixture(scope="module")
def straight(setup):
    """Run A: three epochs straight through; (state, record) of its latest checkpoint."""
    out = setup[0] / "straight"
    assert _run(setup, out) == 0
    return _latest(out)


def test_same_seed_same_run_bitwise_and_another_seed_differs(setup, straight):
    again, other = setup[0] / "again", setup[0] / "other"
    assert _run(setup, again) == 0 and _run(setup, other, "--seed", "1") == 0
    state, record = _latest(again)
    assert _same_state(state, straight[0]) and _numbers(record) == _numbers(straight[1])
    state, record = _latest(other)
    assert not _same_state(state, straight[0]) and _numbers(record) != _numbers(straight[1])
    np.testing.assert_array_equal(train_order(0, 2, 1000), train_order(0, 2, 1000))
    assert not np.array_equal(train_order(0, 2, 1000), train_order(0, 3, 1000))


def test_the_attention_record_holds_every_epoch_from_initialisation(setup, straight):
    with (setup[0] / "straight" / ATTENTION_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    per_epoch = 2 * 4 + 2 + 1  # every head, the two layer means and the uniform head
    assert [int(row["epoch"]) for row in rows] == [e for e in range(4) for _ in range(per_epoch)]
    assert rows[0]["layer"] == "0" and rows[per_epoch - 1]["layer"] == "uniform"
    assert straight[1]["attention_by_epoch"][-1]["epoch"] == 3
    assert rows[0] != {**rows[-per_epoch], "epoch": "0"}  # training changed the attention


# --- signals ----------------------------------------------------------------------------------

# run_experiment.py as a user runs it, but the first chunk of epoch 2 (epoch 1 is a chunk of 4
# steps and one of 2) announces itself on stdout and waits until the run's own SIGTERM handler
# has seen the test's signal: the signal lands at a known step, whatever the machine's speed.
SIGNAL_GATE = """
import runpy, signal, sys, time
import tinylm_jax.run.loop as loop

original, calls = loop._Pass.launch, []


def gated(self, *args, **kwargs):
    if self.function is loop.train_chunk:
        calls.append(1)
        if len(calls) == 3:
            print("third chunk", flush=True)
            handler = signal.getsignal(signal.SIGTERM).__self__  # the run's StopSignals
            deadline = time.monotonic() + 300
            while handler.received is None and time.monotonic() < deadline:
                time.sleep(0.01)
    return original(self, *args, **kwargs)


loop._Pass.launch = gated
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigterm_checkpoints_the_position_and_a_resume_in_another_process_equals_straight(
        setup, straight, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-c", SIGNAL_GATE, *_script(setup, out)[1:]]
    process = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        for line in process.stdout:
            if line == "third chunk\n":
                process.send_signal(signal.SIGTERM)
                break
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal.SIGTERM, err
    # The chunk under way when the signal came finishes; the run stops before the next one.
    assert "stopped by SIGTERM at epoch 2, step 4 of 6; saved checkpoint 2 in" in err
    last = err.rstrip().splitlines()[-1]
    assert "continue with: python" in last and last.endswith("--resume")
    state, record = _latest(out)
    assert record["epoch_in_progress"]["steps_done"] == 4 and int(state.step) == STEPS + 4
    resumed = subprocess.run(_script(setup, out, "--resume"), capture_output=True, text=True,
                             cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {out} at epoch 2, step 4 of 6" in resumed.stdout
    state, record = _latest(out)
    assert _same_state(state, straight[0]) and _numbers(record) == _numbers(straight[1])
    assert _attention_lines(out) == _attention_lines(setup[0] / "straight")


def test_sigint_stops_a_run_like_sigterm_with_exit_130(setup, tmp_path, monkeypatch, capsys):
    """In-process: Ctrl-C during epoch 2's first chunk; the run checkpoints and stops before the
    next chunk (resuming such a checkpoint is the SIGTERM test's)."""
    original, calls = loop._Pass.launch, []

    def ctrl_c_in_the_third_chunk(self, *args, **kwargs):
        if self.function is loop.train_chunk:
            calls.append(1)
            if len(calls) == 3:
                signal.raise_signal(signal.SIGINT)  # handled before raise_signal returns
        return original(self, *args, **kwargs)

    monkeypatch.setattr(loop._Pass, "launch", ctrl_c_in_the_third_chunk)
    out = tmp_path / "run"
    assert _run(setup, out) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped by SIGINT at epoch 2, step 4 of 6; saved checkpoint 2 in" in err
    assert err.rstrip().endswith("--resume")
    state, record = _latest(out)
    assert record["epoch_in_progress"]["steps_done"] == 4 and int(state.step) == STEPS + 4


def test_stop_signals_record_the_first_signal_and_a_second_ctrl_c_interrupts_at_once():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as signals:
        assert not signals.requested()
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested() and signals.received == signal.SIGTERM
        assert signals.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a second SIGTERM only asks again
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C: stop now
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)
        assert (signals.signal_name, signals.received) == ("SIGINT", signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before


# --- --stop-at-step ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(setup):
    """(folder, stderr) of a run stopped by --stop-at-step 8: its latest checkpoint (2, epoch 2
    step 2) is newer than its best (1). Tests that change it work on `stopped_copy`.

    The stops and resumes here fall where the straight run's chunks of 4 and 2 steps do, so that
    they reuse its compiled chunks."""
    out = setup[0] / "stopped-at-8"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert _run(setup, out, "--stop-at-step", "8") == 0
    return out, err.getvalue()


@pytest.fixture
def stopped_copy(stopped, tmp_path):
    """A copy of `stopped`'s folder for a test to change."""
    return shutil.copytree(stopped[0], tmp_path / "run")


def test_stop_at_step_mid_epoch_checkpoints_its_exact_position_and_names_the_resume(
        stopped, straight):
    out, err = stopped
    # Step 8 is inside a chunk (epoch 2 runs in chunks of 4): the stop is exact all the same.
    assert f"stopped at step 8 as asked at epoch 2, step 2 of 6; saved checkpoint 2 in " \
           f"{out / 'checkpoints'}" in err
    assert "--resume" in err.splitlines()[-1] and "--stop-at-step" not in err.splitlines()[-1]
    state, record = _latest(out)
    assert record["epoch_in_progress"]["steps_done"] == 2 and int(state.step) == 8
    assert not _same_state(state, straight[0])  # the interruption happened


def test_stop_at_step_at_an_epoch_end_and_below_the_current_step(setup, capsys, tmp_path):
    out = tmp_path / "run"
    assert _run(setup, out, "--stop-at-step", str(STEPS)) == 0
    assert "stopped at step 6 as asked at epoch 2, step 0 of 6; nothing new to save" in \
        capsys.readouterr().err
    checkpoints = RunCheckpoints(RunFolder(out), read_only=True)
    assert (checkpoints.latest(), checkpoints.best()) == (1, 1)
    checkpoints.close()
    before = snapshot(out)
    assert _run(setup, out, "--resume", "--stop-at-step", "4") == 2
    assert "--stop-at-step 4: the run has already taken 6 steps" in capsys.readouterr().err
    assert snapshot(out) == before


# --- damaged checkpoints ------------------------------------------------------------------------


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, min(len(data), len(data) // 2 + 8)):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_history(path):  # still valid JSON: only the checksum can tell
    record = json.loads(path.read_text())
    record["history"][0]["val_loss"] += 1e-9
    path.write_text(json.dumps(record))


def _biggest_array_file(folder):
    return max((p for p in (folder / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _swap_arrays(checkpoint):  # another checkpoint's valid arrays: only the checksum can tell
    shutil.rmtree(checkpoint / "state")
    shutil.copytree(checkpoint.parent / "1" / "state", checkpoint / "state")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:10])


@pytest.mark.parametrize("damage, found", [
    (lambda ck: _edit_history(ck / "record" / "metadata"), "does not match the checksums"),
    (_swap_arrays, "does not match the checksums"),
    (lambda ck: _flip_bytes(_biggest_array_file(ck)), ""),  # a decode error or the checksums
    (lambda ck: _truncate(_biggest_array_file(ck)), ""),
], ids=["edited-record", "swapped-arrays", "flipped-array-bytes", "truncated-array-file"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact(stopped, stopped_copy,
                                                                     damage, found):
    out = stopped_copy
    damage(out / "checkpoints" / "2")
    warnings = []
    checkpoints = RunCheckpoints(RunFolder(out))
    try:
        template = create_train_state(RunFolder(out).read_config(), "fp32")
        state, record = checkpoints.restore_newest_intact(template, warnings.append)
        assert checkpoints.manager.all_steps() == [1]
    finally:
        checkpoints.close()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: checkpoint 2 in {out.resolve() / 'checkpoints'}")
    assert warnings[0].endswith("; trying an older one") and found in warnings[0]
    assert warnings[1].startswith("warning: continuing from checkpoint 1;")
    aside = _aside(out)  # set aside, not deleted
    assert len(aside) == 1 and aside[0].startswith("2-")
    expected_state, expected_record = _restore(stopped[0], 1)  # the undamaged original's
    assert _same_state(state, expected_state) and record == expected_record


def test_a_resume_past_a_damaged_checkpoint_warns_and_trains_on_from_the_older_one(
        setup, straight, capsys, stopped_copy):
    out = stopped_copy
    _edit_history(out / "checkpoints" / "2" / "record" / "metadata")
    assert _run(setup, out, "--resume", "--stop-at-step", str(STEPS + 2)) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint 2 in" in err and "does not match the checksums" in err
    assert "trying an older one" in err and "continuing from checkpoint 1" in err
    assert "stopped at step 8 as asked at epoch 2, step 2 of 6" in err  # 2 steps from step 6
    assert len(_aside(out)) == 1
    state, record = _latest(out)
    assert int(state.step) == STEPS + 2 and _numbers(record) == _numbers(straight[1])[:1]


def test_a_run_begun_without_a_hook_is_not_resumed_with_it(setup, capsys, stopped_copy):
    """The hook's rows would lack their start: refused in one line, nothing changed."""
    out = stopped_copy
    state, record = _latest(out)
    del record[AttentionRecord.name]
    checkpoints = RunCheckpoints(RunFolder(out))
    checkpoints.save(state, record)  # checkpoint 3: a stop's, of a run without the record
    checkpoints.close()
    before = snapshot(out)
    assert _run(setup, out, "--resume") == 2
    assert "the run was begun without attention_by_epoch" in capsys.readouterr().err
    assert snapshot(out) == before


def test_no_intact_checkpoint_is_refused_and_changes_nothing(setup, capsys, stopped_copy):
    out = stopped_copy
    for number in ("1", "2"):
        _edit_history(out / "checkpoints" / number / "record" / "metadata")
    before = snapshot(out)
    assert _run(setup, out, "--resume") == 2
    assert "no intact checkpoint to resume from (damaged: 2, 1)" in capsys.readouterr().err
    assert snapshot(out) == before


# --- saves that fail ----------------------------------------------------------------------------


def _fail_record_writes(monkeypatch, error, after=0):
    """Make orbax's JSON writes of our record raise `error`, from the (after+1)-th on."""
    original, calls = ocp.JsonCheckpointHandler._save_fn, []

    async def failing(self, item, directory):
        if "checksums" in item:
            calls.append(1)
            if len(calls) > after:
                raise error
        return await original(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing)


SMALL_CONFIG = {"vocab_size": 20, "seq_len": 4, "d_model": 8, "n_heads": 2, "d_ff": 8}


def _small_state():
    return create_train_state(ExperimentConfig(**SMALL_CONFIG), "fp32")


CUT_OFF_SAVE = f"""
import sys
import orbax.checkpoint as ocp
from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.train import create_train_state
from tinylm_jax.run.checkpoint import RunCheckpoints
from tinylm_jax.run.folder import RunFolder


def _small_state():
    return create_train_state(ExperimentConfig(**{SMALL_CONFIG!r}), "fp32")


checkpoints = RunCheckpoints(RunFolder(sys.argv[1]))
checkpoints.save(_small_state(), {{"history": []}})


async def cut_off(self, item, directory):
    raise RuntimeError("power cut")


ocp.JsonCheckpointHandler._save_fn = cut_off
checkpoints.save(_small_state(), {{"history": []}})
"""


def test_a_save_that_never_commits_leaves_the_previous_one_and_is_tidied(tmp_path):
    """The process dies inside its second save (orbax's writes still in flight)."""
    died = subprocess.run([sys.executable, "-c", CUT_OFF_SAVE, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert died.returncode == 1 and "power cut" in died.stderr
    assert list((tmp_path / "checkpoints").glob("2.orbax-checkpoint-tmp*"))
    state = _small_state()
    reopened = RunCheckpoints(RunFolder(tmp_path))  # the next start
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))
    assert reopened.latest() == 1 and _same_state(reopened.restore(1, state)[0], state)
    assert reopened.save(state, {"history": []}) == 2
    reopened.close()


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/d/7": [OS error: No space '
               'left on device]'),
], ids=["errno-28", "tensorstore-resource-exhausted"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
        setup, monkeypatch, capsys, error, tmp_path):
    out = tmp_path / "run"
    _fail_record_writes(monkeypatch, error, after=1)  # epoch 1 saves; epoch 2 hits a full disk
    assert _run(setup, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full, so checkpoint 2 was not saved" in err
    monkeypatch.undo()
    state, record = _latest(out)
    assert len(record["history"]) == 1 and int(state.step) == STEPS


def _blocks(folder):
    """Bytes that the files under `folder` take on disk."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


@pytest.fixture
def small_disk(setup, straight, tmp_path):
    """A real filesystem (tmpfs) that holds a run's first checkpoint and half of its second."""
    folder = setup[0] / "straight"
    one = max(_blocks(checkpoint) for checkpoint in (folder / "checkpoints").iterdir())
    size = _blocks(folder) - _blocks(folder / "checkpoints") + one * 3 // 2
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small disk with")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs",
                              str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (root in a container that allows it is needed): "
                    f"{mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_a_really_full_disk_prints_the_one_line_and_the_run_resumes_once_space_is_freed(
        setup, straight, small_disk):
    """Orbax's writer threads, asyncio and tensorstore print their own tracebacks about a full
    disk (`checkpoint._QuietWhenDiskFull`); the user sees the one line, from a process of its
    own as a user runs it."""
    out = (small_disk / "run").resolve()
    full = subprocess.run(_script(setup, out), capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert full.returncode == 2, full.stderr
    assert full.stderr.splitlines() == [
        f"error: {out}: the disk is full, so checkpoint 2 was not saved; the earlier checkpoints "
        "are intact: free some space, then --resume"], full.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = subprocess.run(_script(setup, out, "--resume"), capture_output=True, text=True,
                             cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    state, record = _latest(out)
    assert _same_state(state, straight[0]) and _numbers(record) == _numbers(straight[1])


@pytest.mark.parametrize("ends_disk_full", [True, False], ids=["disk-full", "other-end"])
def test_the_noise_about_a_full_disk_is_dropped_only_when_the_save_ends_disk_full(
        monkeypatch, caplog, ends_disk_full):
    """What orbax prints about a full disk is held back during a save, and shown after all unless
    the save ends in DiskFull; anything else is shown at once."""
    shown = []
    monkeypatch.setattr(sys, "unraisablehook", shown.append)
    full = ValueError("RESOURCE_EXHAUSTED: ... [OS error: No space left on device]")

    def unraisable(message):
        return SimpleNamespace(object=None, exc_type=RuntimeError,
                               exc_value=RuntimeError(message), exc_traceback=None)

    with caplog.at_level(logging.ERROR), _QuietWhenDiskFull() as quiet:
        for name, err in [("absl", full), ("asyncio", full), ("absl", KeyError("other"))]:
            try:
                raise err
            except Exception:
                logging.getLogger(name).exception("%s failed", name)
        sys.unraisablehook(unraisable("Event loop is closed"))
        sys.unraisablehook(unraisable("something else"))
        assert [type(r.exc_info[1]) for r in caplog.records] == [KeyError]
        assert [str(u.exc_value) for u in shown] == ["something else"]
        quiet.disk_full = ends_disk_full
    assert sys.unraisablehook == shown.append  # put back
    if ends_disk_full:
        assert len(caplog.records) == 1 and len(shown) == 1
    else:
        assert [r.name for r in caplog.records[1:]] == ["absl", "asyncio"]
        assert [str(u.exc_value) for u in shown[1:]] == ["Event loop is closed"]


def test_an_unwritable_output_folder_is_refused_before_training(setup, capsys):
    assert _run(setup, "/proc/tinylm-run") == 2
    assert "/proc: output folder is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("losses, kept, best", [
    ([1.0, 0.8, 0.7, 0.9, 1.2], [3, 5], 3),
    ([1.0, 0.8, math.nan, 0.9, 1.2], [2, 5], 2),
    ([1.0, 0.8, 0.7, 0.9, math.nan], [3, 5], 3),
    ([1.0, None, 0.8, None, 0.9, None], [3, 6], 3),  # None: a stop's checkpoint, no metrics
])
def test_exactly_the_best_and_the_latest_are_kept_across_restarts(tmp_path, losses, kept, best):
    """The best is the protocol's best epoch (`metrics.best_epoch`: a non-finite one never)."""
    state, history = _small_state(), []
    for loss in losses:
        if loss is not None:
            history.append({"epoch": len(history) + 1, "val_ppl": math.exp(loss)})
        checkpoints = RunCheckpoints(RunFolder(tmp_path))  # a restart between every save
        checkpoints.save(state, {"history": list(history)}, epoch_end=loss is not None)
        checkpoints.close()
    checkpoints = RunCheckpoints(RunFolder(tmp_path), read_only=True)
    assert sorted(checkpoints.manager.all_steps()) == kept
    assert (checkpoints.best(), checkpoints.latest()) == (best, len(losses))
    checkpoints.close()


# --- resumes that are refused, divergence, locks ------------------------------------------------


@pytest.mark.parametrize("flags, steps, message", [
    (["--precision", "bf16"], STEPS, "--precision ('auto' -> 'bf16')"),
    ([], 5, "--max-steps-per-epoch (6 -> 5)"),
])
def test_resuming_with_other_settings_is_refused_before_anything_changes(setup, capsys, flags,
                                                                         steps, message,
                                                                         stopped_copy):
    out = stopped_copy
    before = snapshot(out)
    assert _run(setup, out, "--resume", *flags, steps=steps) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("field, value, message", [
    ("d_model", 64, "d_model (32 -> 64)"),
    ("lr", 0.001, "lr (0.03 -> 0.001)"),
    ("grad_clip_norm", 0.5, "grad_clip_norm (1.0 -> 0.5)"),
    ("positions", "none", "positions ('sinusoidal' -> 'none')"),
])
def test_resuming_with_another_model_or_optimiser_is_refused(setup, tmp_path, capsys, field,
                                                             value, message, stopped_copy):
    out = stopped_copy
    before = snapshot(out)
    edited = tiny_toml_file(tmp_path / "edited.toml", **{field: value})
    assert _run(setup, out, "--resume", toml=edited) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_non_finite_loss_stops_with_exit_3_and_no_checkpoint_holds_it(setup, tmp_path,
                                                                         capsys):
    toml = tiny_toml_file(tmp_path / "diverging.toml", lr=1e30)
    out = tmp_path / "run"
    assert _run(setup, out, toml=toml, steps=4) == 3  # one chunk: one compile of this rate
    assert "non-finite training loss; stopped without checkpointing it" in capsys.readouterr().err
    checkpoints = RunCheckpoints(RunFolder(out), read_only=True)
    assert checkpoints.latest() is None  # it diverged in epoch 1: nothing finite to keep
    checkpoints.close()
    state = _small_state()
    state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    with pytest.raises(TrainingDiverged, match="non-finite values"):
        RunCheckpoints(RunFolder(tmp_path / "direct")).save(state, {"history": []})


def test_a_second_run_on_a_folder_in_use_is_refused(setup, capsys, stopped_copy):
    out = stopped_copy
    before = snapshot(out)
    with RunFolder(out).lock():  # another run holds it
        assert _run(setup, out, "--resume") == 2
        assert f"another run is using this run folder (pid {os.getpid()})" in \
            capsys.readouterr().err
        assert _run(setup, out, "--overwrite") == 2
        assert snapshot(out) == before
    # Free again: a resume takes the lock and trains (two steps are enough to show it).
    assert _run(setup, out, "--resume", "--stop-at-step", "10") == 0
    assert int(_latest(out)[0].step) == 10


def test_checkpoints_of_earlier_versions_rank_below_any_new_best():
    """Before the best-epoch rank, an epoch's checkpoint carried its validation loss: it still
    ranks, by that loss, and below every new best saved since (ranks 1, 2, ...)."""
    old = [_rank({"val_loss": loss}) for loss in (4.5, 4.2, math.nan)]
    assert old[1] > old[0] > old[2] == 0.0 and max(old) < 1
    assert _rank({"new_best_epoch": 1}) > max(old) and _rank({"new_best_epoch": 0}) == 0


def test_a_state_saves_only_the_fields_that_hold_arrays():
    """Without averaging, `ema_params` holds nothing and is not saved, so checkpoints written
    before the field still restore; with it, the average is saved."""
    plain = _small_state()
    assert "ema_params" not in plain.arrays() and {"params", "opt_state", "plateau_state",
                                                   "step"} <= set(plain.arrays())
    averaged = create_train_state(ExperimentConfig(**{**SMALL_CONFIG, "ema_decay": 0.9}), "fp32")
    assert "ema_params" in averaged.arrays()
