"""Stopping and resuming: exact resume, signals, damaged checkpoints, full disks, locks, NaN.

Every run here is the tiny experiment cut to 6 steps per epoch, so a run takes seconds. "The same"
means bitwise: params, optimiser state, plateau state, step, and the history's numbers (all but
its timings).
"""

import csv
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, TINY_TOML, snapshot

from tinylm_jax.cli.run_experiment import main
from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.data import train_order
from tinylm_jax.core.train import TrainingDiverged, create_train_state
from tinylm_jax.run.checkpoint import RunCheckpoints
from tinylm_jax.run.folder import RunFolder

STEPS = 6  # per epoch, via --max-steps-per-epoch
TIMINGS = ("epoch_seconds", "train_tokens_per_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus_text):
    """(folder, toml, corpus): three epochs of 6 steps, 4 steps per compiled chunk."""
    root = tmp_path_factory.mktemp("reliability")
    toml, corpus = root / "tiny.toml", root / "tiny.txt"
    toml.write_text(TINY_TOML.replace("num_epochs = 4", "num_epochs = 3"))
    corpus.write_text(corpus_text[:8000], encoding="utf-8")
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


def _latest(out, which="latest"):
    """(state, record) of a run folder's latest (or best) checkpoint, verified."""
    cfg = RunFolder(out).read_config()
    checkpoints = RunCheckpoints(RunFolder(out), read_only=True)
    try:
        number = checkpoints.latest() if which == "latest" else checkpoints.best()
        return checkpoints.restore(number, create_train_state(cfg, "fp32"))
    finally:
        checkpoints.close()


def _leaves(state):
    return jax.tree.leaves((state.params, state.opt_state, state.plateau_state, state.step))


def _same_state(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def _numbers(record):
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in record["history"]]


def _attention_lines(out):
    """attention_by_epoch.csv's lines: a resumed run's must be a straight run's, byte for byte."""
    return (out / RunFolder.ATTENTION).read_bytes().splitlines()


@pytest.fixture(scope="module")
def straight(setup):
    """Run A: three epochs straight through."""
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


def test_stopped_mid_epoch_in_one_process_and_resumed_in_another_equals_straight(setup,
                                                                                 straight):
    out = setup[0] / "stopped"
    stopped = subprocess.run(_script(setup, out, "--stop-at-step", "9"), capture_output=True,
                             text=True, cwd=REPO, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped at step 9 as asked at epoch 2, step 3 of 6" in stopped.stderr
    assert "--resume" in stopped.stderr.splitlines()[-1]
    state_b, record_b = _latest(out)
    assert record_b["epoch_in_progress"]["steps_done"] == 3 and int(state_b.step) == 9
    assert not _same_state(state_b, straight[0])  # the interruption happened
    resumed = subprocess.run(_script(setup, out, "--resume"), capture_output=True, text=True,
                             cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "epoch 2, step 3 of 6" in resumed.stdout
    state_c, record_c = _latest(out)
    assert _same_state(state_c, straight[0])
    assert _numbers(record_c) == _numbers(straight[1])
    assert _attention_lines(out) == _attention_lines(setup[0] / "straight")


def test_the_attention_record_holds_every_epoch_from_initialisation(setup, straight):
    with (setup[0] / "straight" / RunFolder.ATTENTION).open(newline="") as f:
        rows = list(csv.DictReader(f))
    per_epoch = 2 * 4 + 2 + 1  # every head, the two layer means and the uniform head
    assert [int(row["epoch"]) for row in rows] == [e for e in range(4) for _ in range(per_epoch)]
    assert rows[0]["layer"] == "0" and rows[per_epoch - 1]["layer"] == "uniform"
    assert straight[1]["attention_by_epoch"][-1]["epoch"] == 3
    assert rows[0] != {**rows[-per_epoch], "epoch": "0"}  # training changed the attention


@pytest.fixture(scope="module")
def long_epochs(setup, corpus_text):
    """(flags, straight run folder): two epochs of about 3,000 steps, one step per chunk."""
    root = setup[0]
    toml, corpus = root / "long.toml", root / "long.txt"
    toml.write_text(TINY_TOML.replace("batch_size = 32", "batch_size = 4")
                    .replace("num_epochs = 4", "num_epochs = 2"))
    corpus.write_text(corpus_text[:40000], encoding="utf-8")
    flags = [str(toml), "--data", str(corpus), "--no-progress", "--steps-per-chunk", "1"]
    assert main([*flags, "--out", str(root / "long-straight")]) == 0
    return flags, root / "long-straight"


def _signalled(flags, out, signum):
    """Run in a process of its own and signal it a second into epoch 2 (everything compiled);
    (exit code, stderr, seconds from the signal to the exit)."""
    command = [sys.executable, str(REPO / "scripts" / "run_experiment.py"), *flags,
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if line.startswith("epoch 1/2"):
            break
    time.sleep(1.0)
    process.send_signal(signum)
    sent = time.monotonic()
    _, err = process.communicate(timeout=120)
    return process.returncode, err, time.monotonic() - sent


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_position_and_resume_equals_the_straight_run(
        tmp_path, long_epochs, signum):
    flags, straight_run = long_epochs
    out = tmp_path / "run"
    code, err, seconds = _signalled(flags, out, signum)
    assert code == 128 + signum, err
    assert seconds < 15
    assert f"stopped by {signal.Signals(signum).name} at epoch 2, step " in err
    assert "saved checkpoint 2" in err
    assert "continue with: python" in err and err.rstrip().endswith("--resume")
    progress = _latest(out)[1]["epoch_in_progress"]
    assert 0 < progress["steps_done"] < progress["steps_total"]
    assert main([*flags, "--out", str(out), "--resume"]) == 0
    final, record = _latest(out)
    expected, expected_record = _latest(straight_run)
    assert _same_state(final, expected) and _numbers(record) == _numbers(expected_record)
    assert _attention_lines(out) == _attention_lines(straight_run)


def test_stop_at_step_at_an_epoch_end_and_below_the_current_step(setup, straight, capsys,
                                                                  tmp_path):
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
    assert _run(setup, out, "--resume") == 0
    state, record = _latest(out)
    assert _same_state(state, straight[0]) and _numbers(record) == _numbers(straight[1])


@pytest.fixture(scope="module")
def stopped(setup):
    """A run folder whose latest checkpoint (2, epoch 2 step 3) is newer than its best (1)."""
    out = setup[0] / "stopped-at-9"
    assert _run(setup, out, "--stop-at-step", "9") == 0
    return out


@pytest.fixture
def stopped_copy(stopped, tmp_path):
    """A copy of `stopped` for a test to change."""
    return shutil.copytree(stopped, tmp_path / "run")


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


@pytest.mark.parametrize("damage, found", [
    (lambda ck: _edit_history(ck / "record" / "metadata"), "does not match the checksums"),
    (_swap_arrays, "does not match the checksums"),
    (lambda ck: _flip_bytes(_biggest_array_file(ck)), ""),  # a decode error or the checksums
    (lambda ck: _biggest_array_file(ck).write_bytes(_biggest_array_file(ck).read_bytes()[:10]),
     ""),
], ids=["edited-record", "swapped-arrays", "flipped-array-bytes", "truncated-array-file"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact(setup, straight, capsys,
                                                                     stopped_copy, damage, found):
    out = stopped_copy
    damage(out / "checkpoints" / "2")
    assert _run(setup, out, "--resume") == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint 2 in" in err and "trying an older one" in err and found in err
    assert "continuing from checkpoint 1" in err
    aside = list((out / RunFolder.CORRUPT).iterdir())  # set aside, not deleted
    assert len(aside) == 1 and aside[0].name.startswith("2-")
    state, record = _latest(out)
    assert _same_state(state, straight[0]) and _numbers(record) == _numbers(straight[1])
    assert _attention_lines(out) == _attention_lines(setup[0] / "straight")


def test_a_run_folder_from_before_positions_and_the_attention_record_resumes(setup, straight,
                                                                              stopped_copy):
    out = stopped_copy
    config = json.loads((out / "config.json").read_text())
    del config["experiment"]["positional_encoding"]  # as config.json was then
    (out / "config.json").write_text(json.dumps(config))
    state, record = _latest(out)
    del record["attention_by_epoch"]
    checkpoints = RunCheckpoints(RunFolder(out))
    checkpoints.save(state, record)  # checkpoint 3: the stop's, as saved then
    checkpoints.close()
    (out / RunFolder.ATTENTION).unlink()
    assert _run(setup, out, "--resume") == 0
    state, record = _latest(out)
    assert _same_state(state, straight[0]) and _numbers(record) == _numbers(straight[1])
    assert RunFolder(out).read_config().positional_encoding == "sinusoidal"
    assert not (out / RunFolder.ATTENTION).exists()  # no record without its epoch 0


def test_no_intact_checkpoint_is_refused_and_changes_nothing(setup, capsys, stopped_copy):
    out = stopped_copy
    for number in ("1", "2"):
        _edit_history(out / "checkpoints" / number / "record" / "metadata")
    before = snapshot(out)
    assert _run(setup, out, "--resume") == 2
    assert "no intact checkpoint to resume from (damaged: 2, 1)" in capsys.readouterr().err
    assert snapshot(out) == before


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


def _small_state():
    return create_train_state(ExperimentConfig(vocab_size=20, seq_len=4, d_model=8, n_heads=2,
                                               d_ff=8), "fp32")


CUT_OFF_SAVE = """
import sys
import orbax.checkpoint as ocp
from tinylm_jax.run.checkpoint import RunCheckpoints
from tinylm_jax.run.folder import RunFolder
from test_reliability import _small_state

checkpoints = RunCheckpoints(RunFolder(sys.argv[1]))
checkpoints.save(_small_state(), {"history": []}, 1.0)


async def cut_off(self, item, directory):
    raise RuntimeError("power cut")


ocp.JsonCheckpointHandler._save_fn = cut_off
checkpoints.save(_small_state(), {"history": []}, 0.5)
"""


def test_a_save_that_never_commits_leaves_the_previous_one_and_is_tidied(tmp_path):
    """The process dies inside its second save (orbax's writes still in flight)."""
    died = subprocess.run([sys.executable, "-c", CUT_OFF_SAVE, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
    assert died.returncode == 1 and "power cut" in died.stderr
    assert list((tmp_path / "checkpoints").glob("2.orbax-checkpoint-tmp*"))
    state = _small_state()
    reopened = RunCheckpoints(RunFolder(tmp_path))  # the next start
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))
    assert reopened.latest() == 1 and _same_state(reopened.restore(1, state)[0], state)
    assert reopened.save(state, {"history": []}, 0.5) == 2
    reopened.close()


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/d/7": [OS error: No space '
               'left on device]'),
], ids=["errno-28", "tensorstore-resource-exhausted"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
        setup, monkeypatch, capsys, error):
    out = setup[0] / f"full-{type(error).__name__}"
    _fail_record_writes(monkeypatch, error, after=1)  # epoch 1 saves; epoch 2 hits a full disk
    assert _run(setup, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is full, so checkpoint 2 was not saved" in err
    monkeypatch.undo()
    state, record = _latest(out)
    assert len(record["history"]) == 1 and int(state.step) == STEPS


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
    state = _small_state()
    for loss in losses:
        checkpoints = RunCheckpoints(RunFolder(tmp_path))  # a restart between every save
        checkpoints.save(state, {"history": []}, loss)
        checkpoints.close()
    checkpoints = RunCheckpoints(RunFolder(tmp_path), read_only=True)
    assert sorted(checkpoints.manager.all_steps()) == kept
    assert (checkpoints.best(), checkpoints.latest()) == (best, len(losses))
    checkpoints.close()


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


@pytest.mark.parametrize("change, message", [
    ("d_model = 64\n", "d_model (32 -> 64)"),
    ("lr = 0.001\n", "lr (0.03 -> 0.001)"),
    ("grad_clip_norm = 0.5\n", "grad_clip_norm (1.0 -> 0.5)"),
    ('positional_encoding = "none"\n', "positional_encoding ('sinusoidal' -> 'none')"),
])
def test_resuming_with_another_model_or_optimiser_is_refused(setup, tmp_path, capsys, change,
                                                             message, stopped_copy):
    out = stopped_copy
    before = snapshot(out)
    edited = tmp_path / "edited.toml"
    edited.write_text("".join(line + "\n" for line in TINY_TOML.splitlines()
                              if line.split(" =")[0] != change.split(" =")[0]) + change)
    assert _run(setup, out, "--resume", toml=edited) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_non_finite_loss_stops_with_exit_3_and_no_checkpoint_holds_it(setup, tmp_path,
                                                                         capsys):
    toml = tmp_path / "diverging.toml"
    toml.write_text(TINY_TOML.replace("lr = 0.03", "lr = 1e30"))
    out = tmp_path / "run"
    assert _run(setup, out, toml=toml) == 3
    assert "non-finite training loss; stopped without checkpointing it" in capsys.readouterr().err
    checkpoints = RunCheckpoints(RunFolder(out), read_only=True)
    assert checkpoints.latest() is None  # it diverged in epoch 1: nothing finite to keep
    checkpoints.close()
    state = _small_state()
    state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    with pytest.raises(TrainingDiverged, match="non-finite values"):
        RunCheckpoints(RunFolder(tmp_path / "direct")).save(state, {"history": []}, 1.0)


def test_a_second_run_on_a_folder_in_use_is_refused(setup, capsys, stopped_copy):
    out = stopped_copy
    before = snapshot(out)
    with RunFolder(out).lock():  # another run holds it
        assert _run(setup, out, "--resume") == 2
        assert f"another run is using this run folder (pid {os.getpid()})" in \
            capsys.readouterr().err
        assert _run(setup, out, "--overwrite") == 2
        assert snapshot(out) == before
    assert _run(setup, out, "--resume") == 0  # free again
