"""Time to quality on synthetic run folders: the first crossing, steps with and without
history.csv's `step` column, the seconds' sum, a set's aggregates, and the command line."""

from pathlib import Path

import pytest

from tinylm_jax.analysis.time_to_quality import RunCurve, read_quality_sets, steps_per_epoch
from tinylm_jax.cli import tinylm
from tinylm_jax.core.config import load_config
from tinylm_jax.run.folder import SUMMARY_FIELDS, RunFolder, seed_member


def write_run(path: Path, seed: int, ppl: list[float], seconds: list[float],
              steps: list[int] | None = None, train_windows: int = 1000,
              max_steps_per_epoch: int | None = None, eval_every: int = 0) -> Path:
    """A finished run folder of the baseline's config (batch size 512) with these epochs."""
    folder = RunFolder(path)
    path.mkdir(parents=True)
    folder.write_record(load_config("baseline", {"seed": seed, "eval_every": eval_every}),
                        {"precision": "fp32", "max_steps_per_epoch": max_steps_per_epoch,
                         "corpus_sha256": "0" * 64})
    rows = [{"epoch": epoch, "train_loss": 4.0, "val_loss": 4.0, "val_ppl": value, "lr": 3e-4,
             "epoch_seconds": took, "train_tokens_per_s": 1.0}
            for epoch, (value, took) in enumerate(zip(ppl, seconds, strict=True), start=1)]
    for row, step in zip(rows, steps or [], strict=False):
        row["step"] = step
    folder.write_history(rows)
    summary = dict.fromkeys(SUMMARY_FIELDS, None)
    summary.update(best_val_ppl=min(ppl), best_epoch=ppl.index(min(ppl)) + 1,
                   train_windows=train_windows, max_steps_per_epoch=max_steps_per_epoch,
                   device_kind="cpu", experiment="baseline")
    folder.write_summary(summary)
    return path


def one_run(tmp_path: Path, **kwargs) -> RunCurve:
    """The one run of a set made of one run folder."""
    (group,) = read_quality_sets([write_run(tmp_path / "run", 0, **kwargs)])
    return group.runs[0]


def test_a_run_reaches_a_threshold_at_its_first_crossing_not_its_best(tmp_path):
    run = one_run(tmp_path, ppl=[70.0, 59.9, 58.0, 60.5, 57.0], seconds=[10.0] * 5)
    first = run.crossing(60.0)
    assert (first.epoch, first.step, first.ppl) == (2, 4, 59.9)  # 1000 windows / 512: 2 steps
    assert run.crossing(58.0).epoch == 3  # "at or below"
    assert run.crossing(50.0) is None  # never reached
    assert run.best == (57.0, 5)


def test_steps_come_from_the_step_column_where_the_history_has_it(tmp_path):
    run = one_run(tmp_path, ppl=[70.0, 59.0], seconds=[1.0, 1.0], steps=[300, 600])
    assert run.steps == [300, 600] and run.crossing(60.0).step == 600
    every = one_run(tmp_path / "every", ppl=[70.0, 59.0], seconds=[1.0, 1.0], steps=[175, 350],
                    eval_every=175, train_windows=358_122)
    assert every.steps_per_epoch == 175  # an epoch of the protocol: between two evaluations


def test_without_the_step_column_an_epoch_is_a_pass_of_ceil_windows_over_batch(tmp_path):
    assert steps_per_epoch(358_122, 512, None) == 700  # the reference's 699.4 rounded up
    assert steps_per_epoch(1024, 512, None) == 2 and steps_per_epoch(1025, 512, None) == 3
    assert steps_per_epoch(358_122, 512, 50) == 50  # --max-steps-per-epoch caps it
    run = one_run(tmp_path, ppl=[70.0, 65.0, 59.0], seconds=[1.0] * 3, train_windows=1025)
    assert run.steps == [3, 6, 9] and run.steps_per_epoch == 3
    capped = one_run(tmp_path / "capped", ppl=[70.0, 59.0], seconds=[1.0] * 2,
                     max_steps_per_epoch=1)
    assert capped.steps == [1, 2]


def test_seconds_are_the_training_seconds_summed_up_to_the_crossing(tmp_path):
    run = one_run(tmp_path, ppl=[70.0, 65.0, 59.0, 58.0], seconds=[10.5, 20.0, 30.25, 99.0])
    assert run.seconds == [10.5, 30.5, 60.75, 159.75]
    assert run.crossing(60.0).seconds == 60.75


def test_a_set_aggregates_over_the_seeds_that_reached_the_threshold(tmp_path):
    root = tmp_path / "set"
    write_run(seed_member(root, 0), 0, [70.0, 59.0, 58.0], [10.0, 10.0, 10.0])
    write_run(seed_member(root, 1), 1, [70.0, 62.0, 59.5], [20.0, 20.0, 20.0])
    write_run(seed_member(root, 2), 2, [71.0, 63.0, 61.0], [5.0, 5.0, 5.0])
    (group,) = read_quality_sets([root])
    assert [run.seed for run in group.runs] == [0, 1, 2]
    reached = group.aggregate(60.0)
    assert (reached.reached, reached.runs) == (2, 3)
    assert reached.steps == (5.0, 4, 6)  # epochs 2 and 3, 2 steps each
    assert reached.seconds == (40.0, 20.0, 60.0)
    nobody = group.aggregate(50.0)
    assert (nobody.reached, nobody.steps, nobody.seconds) == (0, None, None)
    assert group.band()[0] == (2, 70.333333333333333, 70.0, 71.0)


def test_the_command_writes_the_table_and_the_curve_with_its_command(tmp_path, capsys):
    root = tmp_path / "set"
    write_run(seed_member(root, 0), 0, [70.0, 59.0], [10.0, 10.0])
    write_run(seed_member(root, 1), 1, [70.0, 61.0], [10.0, 10.0])
    out = tmp_path / "out"
    argv = ["time-to-quality", str(root), "--out", str(out), "--thresholds", "60,58.35"]
    assert tinylm.main(argv) == 0
    report = (out / "time_to_quality.md").read_text()
    assert f"Reproduce: `tinylm time-to-quality {root} --out {out} --thresholds 60,58.35`" in report
    assert "| 60.00 | 1 of 2 | 4 | - | 20 | - | cpu |" in report
    assert "| 58.35 | 0 of 2 | - | - | - | - | cpu |" in report
    assert "validation time is excluded" in report
    assert (out / "time_to_quality.png").stat().st_size > 0
    assert capsys.readouterr().out.startswith("# Time to quality")


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), "no finished run under"),
    (lambda root: (root / "seed-0").mkdir(parents=True), "no finished run under"),
    (lambda root: (write_run(root, 0, [70.0], [1.0]) / "config.json").unlink(),
     "{root}: not a run folder (no config.json)"),
])
def test_a_folder_without_finished_runs_is_one_line_and_exit_2(tmp_path, capsys, make, message):
    root = tmp_path / "set"
    make(root)
    assert tinylm.main(["time-to-quality", str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(root=root)}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_thresholds_are_one_line_and_exit_2(tmp_path, capsys):
    root = write_run(tmp_path / "run", 0, [70.0], [1.0])
    for bad in ("60,abc", "-1"):
        assert tinylm.main(["time-to-quality", str(root), "--out", str(tmp_path / "out"),
                            "--thresholds", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --thresholds") and err.count("\n") == 1
