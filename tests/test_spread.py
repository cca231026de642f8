"""The run-to-run spread: its statistics on known numbers, and its report on real run folders."""

import json
import math
import shutil

import pytest

from tinylm_jax.analysis.evaluation import evaluate_run
from tinylm_jax.analysis.spread import (
    ExperimentSpread,
    SeedRun,
    best_epochs_sentence,
    best_epochs_text,
    read_sets,
    spread,
    where_it_falls,
)
from tinylm_jax.cli.analyze import analyze_main
from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.run.folder import seed_members

TINY = ExperimentConfig(name="tiny")  # a hand-built set's config: these tests read its runs


def test_the_spread_of_known_numbers():
    """Three runs: a resample of all three equal to one extreme has chance 1/27, above 2.5%, so
    the interval is the range itself; from four runs on (1/256) it lies inside the range."""
    result = spread([60.0, 61.0, 62.0])
    assert (result.n, result.mean, result.std, result.low, result.high) == (3, 61.0, 1.0, 60.0,
                                                                            62.0)
    assert (result.ci_low, result.ci_high) == (60.0, 62.0)
    four = spread([60.0, 61.0, 61.0, 62.0])
    assert 60.0 < four.ci_low < 61.0 < four.ci_high < 62.0


def test_the_bootstrap_interval_is_exact_where_it_can_be_worked_by_hand():
    """Resampling [0, 10] gives a mean of 0, 5 or 10 with chances 1/4, 1/2, 1/4: the 2.5th and
    97.5th percentiles are 0 and 10. Equal values leave no spread at all."""
    pair = spread([0.0, 10.0])
    assert (pair.mean, pair.std, pair.ci_low, pair.ci_high) == (5.0, math.sqrt(50), 0.0, 10.0)
    same = spread([58.5] * 4)
    assert (same.std, same.ci_low, same.ci_high) == (0.0, 58.5, 58.5)
    one = spread([60.0])
    assert math.isnan(one.std) and (one.ci_low, one.ci_high) == (60.0, 60.0)
    assert (one.mean_and_sd(), pair.mean_and_sd()) == ("60.00", "5.00 ± 7.07")
    assert (one.range_text(), one.interval_text()) == ("-", "-")
    assert (pair.range_text(), pair.interval_text()) == ("0.00-10.00", "0.00-10.00")
    assert spread([1.0, 5.0, 2.0, 9.0]) == spread([1.0, 5.0, 2.0, 9.0])  # reproducible


def test_best_epochs_read_as_a_range_then_each_run_s_and_one_run_s_alone():
    assert best_epochs_text([6, 5, 6]) == "5-6 (6, 5, 6)"
    assert best_epochs_text([6, 6]) == "6 (6, 6)"
    assert best_epochs_text([13]) == "13"
    assert best_epochs_sentence([5, 6, 5]) == "the runs' best epochs are 5, 6, 5"
    assert best_epochs_sentence([4]) == "the one run's best epoch is 4"


def test_a_run_still_improving_at_the_epoch_cap_has_its_best_epoch_read_as_a_lower_bound(
        tmp_path):
    def run(best_epoch, epochs_run):  # falling to its best epoch, rising after it
        curve = [70.0 - min(epoch, best_epoch) + max(0, epoch - best_epoch)
                 for epoch in range(1, epochs_run + 1)]
        return SeedRun(tmp_path, 0, [{"epoch": i + 1, "val_ppl": v} for i, v in enumerate(curve)],
                       {"best_epoch": best_epoch})
    group = ExperimentSpread("tiny", "tiny", [run(13, 14), run(20, 20)], TINY)
    assert group.still_improving == [False, True]
    assert best_epochs_text(group.best_epochs, group.still_improving) == "13-20+ (13, 20+)"
    assert best_epochs_text([20, 20], [True, True]) == "20+ (20+, 20+)"
    assert best_epochs_text([20, 20], [False, True]) == "20+ (20, 20+)"
    with pytest.raises(ValueError):
        best_epochs_text([13], [])
    assert best_epochs_sentence([20], [True]) == (
        "the one run's best epoch is 20+ (a + marks a run whose last epoch was still a new best: "
        "the epoch cap ended it, so its best epoch is a lower bound)")


def test_the_band_over_every_run_stops_at_the_first_early_stop(tmp_path):
    def run(seed, curve):
        return SeedRun(tmp_path, seed, [{"epoch": i + 1, "val_ppl": v} for i, v in
                                        enumerate(curve)], {})
    group = ExperimentSpread("tiny", "tiny", [run(0, [70.0, 63.0, 63.3]),
                                              run(1, [71.0, 65.8, 65.5, 65.9])], TINY)
    assert [(epoch, band.n) for epoch, band in group.band()] == [(1, 2), (2, 2), (3, 2), (4, 1)]
    assert [(epoch, band.mean) for epoch, band in group.common_band()] == [
        (1, 70.5), (2, pytest.approx(64.4)), (3, pytest.approx(64.4))]
    alone = ExperimentSpread("tiny", "tiny", [run(1, [71.0, 65.8, 65.5, 65.9])], TINY)
    assert [epoch for epoch, _ in alone.common_band()] == [1, 2, 3, 4]


def test_where_a_reference_number_falls():
    runs = spread([60.0, 61.0, 62.0])
    assert where_it_falls(60.5, runs) == "inside the range, -0.5 sd from the mean"
    assert where_it_falls(58.0, runs) == "outside the range, -3.0 sd from the mean"
    assert where_it_falls(60.0, spread([62.5, 62.5])) == "outside the range"
    assert where_it_falls(60.0, spread([62.5])) == "-4.0% from the one run"


@pytest.fixture
def two_seeds(tiny_run, tmp_path):
    """A set of two finished tiny runs (seed-0 and, by copy with its seed changed, seed-5) and
    one unfinished member."""
    source, _ = tiny_run
    root = tmp_path / "set"
    shutil.copytree(source, root / "seed-0")
    shutil.copytree(source, root / "seed-5")
    config = json.loads((root / "seed-5" / "config.json").read_text())
    config["experiment"]["seed"] = 5
    (root / "seed-5" / "config.json").write_text(json.dumps(config))
    (root / "seed-7").mkdir()  # begun, nothing finished
    (root / "seed-7" / "config.json").write_text((source / "config.json").read_text())
    return root


def test_a_set_reads_its_finished_members_and_reports_them(two_seeds, tmp_path, capsys):
    (group,) = read_sets([two_seeds])
    assert [run.seed for run in group.runs] == [0, 5]
    out = tmp_path / "report"
    assert analyze_main(["spread", str(two_seeds), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {out / 'spread.md'}",
                                                    f"wrote {out / 'spread.png'}"]
    report = (out / "spread.md").read_text()
    assert "| tiny (bfloat16) | 2 (0, 5) |" in report
    assert "## tiny (bfloat16), epoch by epoch" in report


def test_the_spread_in_nats_agrees_with_evaluate_run_by_run(two_seeds, tiny_run, tmp_path):
    """--nats: each run's best nats per token is its best validation loss, and per character
    the loss over the characters `tinylm evaluate` counts; the last epoch's beside it."""
    _, corpus = tiny_run
    out = tmp_path / "report"
    assert analyze_main(["spread", str(two_seeds), "--out", str(out), "--nats", "--data",
                         str(corpus)]) == 0
    report = (out / "spread.md").read_text()
    evaluation = evaluate_run(two_seeds / "seed-0", str(corpus))
    (group,) = read_sets([two_seeds])
    per_token, per_char, last = group.nats(evaluation.chars / evaluation.tokens)
    assert per_token.mean == pytest.approx(evaluation.nats_per_token, rel=1e-9)
    assert per_char.mean == pytest.approx(evaluation.nats_per_char, rel=1e-9)
    last_loss = group.runs[0].history[-1]["val_loss"]
    assert last.mean == pytest.approx(last_loss * evaluation.tokens / evaluation.chars)
    assert (f"| tiny (bfloat16) | {evaluation.chars / evaluation.tokens:.4f} | "
            f"{evaluation.nats_per_token:.4f} ± 0.0000 | {evaluation.nats_per_char:.4f} ± 0.0000 |"
            in report)
    assert f"| {group.last.mean_and_sd()} |" in report  # the last epoch's PPL, in the main table


def test_an_ablation_judges_each_element_against_the_full_recipe_s_seeds(two_seeds, tmp_path,
                                                                         capsys):
    """The full recipe's two seeds (one copy with its best moved up by 2) against two ablated
    sets: one worse than both seeds, one inside their range, each row named by the field its
    config changes. Worth and the paired difference are read against the right runs; a set that
    changes nothing, or ran another precision, is refused."""
    summary_file = two_seeds / "seed-5" / "summary.json"
    summary = json.loads(summary_file.read_text())
    low = summary["best_val_ppl"]
    summary_file.write_text(json.dumps({**summary, "best_val_ppl": low + 2}))
    ablation = tmp_path / "ablation"

    def member(folder, seed, best, **changes):
        path = ablation / folder / f"seed-{seed}"
        shutil.copytree(two_seeds / "seed-0", path)
        config = json.loads((path / "config.json").read_text())
        config["experiment"].update(seed=seed, name=f"tiny [{folder}]", **changes.pop("cfg", {}))
        more = changes.pop("summary", {})
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))
        (path / "summary.json").write_text(json.dumps({**summary, "best_val_ppl": best, **more}))
        return path.parent

    worse = member("a", 0, low + 3.0, cfg={"dropout": 0.25})
    inside = member("b", 5, low + 1.0, cfg={"mlp": "swiglu", "d_ff": 48}, products="mkl",
                    summary={"cpu": "elsewhere"})
    out = tmp_path / "report"
    assert analyze_main(["ablation", str(two_seeds), str(worse), str(inside), "--out",
                         str(out)]) == 0
    rows = {line.split(" | ")[0]: line.split(" | ") for line in
            (out / "ablation.md").read_text().splitlines() if line.startswith("| ")}
    assert rows["| dropout=0.25"][6:10] == ["+2.00", f"{2 / math.sqrt(2):+.1f}", "+3.00",
                                            "yes: worse than every seed"]
    assert rows["| d_ff=48,mlp=swiglu"][6:9] == ["+0.00", "+0.0", "-1.00"]  # seed 5 was at +2
    assert rows["| d_ff=48,mlp=swiglu"][9] == "no: inside the seeds' range"
    assert rows["| d_ff=48,mlp=swiglu"][10] == "elsewhere, mkl products |"  # another machine's
    for refused_set, words in ((member("c", 0, low), "takes nothing away"),
                               (member("d", 0, low, cfg={"dropout": 0.25},
                                       compute_dtype="float32"), "another precision")):
        assert analyze_main(["ablation", str(two_seeds), str(refused_set), "--out",
                             str(out)]) == 2
        assert words in capsys.readouterr().err
    assert analyze_main(["ablation", str(two_seeds), "--out", str(out)]) == 2
    assert "then the ablated sets" in capsys.readouterr().err


def test_a_seed_counted_twice_is_refused(two_seeds, tiny_run):
    with pytest.raises(UserError, match="seed 0 appears in more than one run folder"):
        read_sets([two_seeds, tiny_run[0]])


def test_a_set_s_members_are_its_seed_folders_in_seed_order(tmp_path):
    for name in ("seed-12", "seed-0", "seed-3", "seed-x", "seed-²", "seed-"):
        (tmp_path / name).mkdir()
    (tmp_path / "seed-5").write_text("a file, not a run folder")
    assert seed_members(tmp_path) == [(0, tmp_path / "seed-0"), (3, tmp_path / "seed-3"),
                                      (12, tmp_path / "seed-12")]


def test_a_member_whose_summary_lacks_a_field_is_refused_naming_it(two_seeds, capsys):
    summary_file = two_seeds / "seed-5" / "summary.json"
    summary = json.loads(summary_file.read_text())
    del summary["best_val_ppl"]
    summary_file.write_text(json.dumps(summary))
    assert analyze_main(["spread", str(two_seeds), "--out", str(two_seeds / "report")]) == 2
    assert capsys.readouterr().err.strip().endswith("unreadable summary (no best_val_ppl)")
    assert not (two_seeds / "report").exists()


def test_a_run_is_labelled_by_its_chip_where_recorded_else_by_jax_device_kind(tmp_path):
    def device(**summary) -> str:
        return SeedRun(tmp_path, 0, [], summary).device

    assert device(cpu="AMD EPYC (2 cores)", device_kind="cpu") == "AMD EPYC (2 cores)"
    assert device(cpu=None, device_kind="cpu") == "cpu"  # runs from before the chip was recorded
    assert device() == "unknown"
