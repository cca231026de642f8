"""The protocol's clock (`core.protocol`): with the defaults it is the reference's epochs; with
a step budget, evaluations every N steps on a fixed sample, strided windows and checkpoints
every N steps, a run on a non-English text with a byte-level tokenizer, stopped anywhere,
resumes exactly."""

import jax
import numpy as np
import pytest
from conftest import TINY_CHARS, tiny_config, tiny_toml_file

from tinylm_jax.analysis.budget import run_curve
from tinylm_jax.analysis.runs import read_finished_runs
from tinylm_jax.cli.run_experiment import main as train_main
from tinylm_jax.core.data import Splits, batch_rows, train_order
from tinylm_jax.core.protocol import Clock, validation_sample
from tinylm_jax.run.checkpoint import load_run
from tinylm_jax.run.folder import RunFolder

SPLITS = Splits.of(num_tokens=5000, seq_len=16, train_fraction=0.8)  # 3,987 train windows


def test_with_the_defaults_the_clock_is_the_reference_s_epochs():
    cfg = tiny_config(batch_size=64, num_epochs=3)
    clock = Clock.of(cfg, SPLITS)
    assert clock.steps_per_pass == clock.eval_every == -(-SPLITS.num_train // 64)
    assert clock.epochs == 3 and clock.total_steps == 3 * clock.steps_per_pass
    for epoch in (1, 2):
        first, end = clock.epoch_span(epoch)
        expected = batch_rows(train_order(cfg.seed, epoch, SPLITS.num_train), 64)
        got = clock.train_rows(first, end)
        for key in ("starts", "weights"):
            np.testing.assert_array_equal(got[key], expected[key])
    np.testing.assert_array_equal(clock.val_indices, np.arange(SPLITS.num_val))


def test_an_epoch_of_n_steps_runs_across_passes_in_the_passes_order():
    cfg = tiny_config(batch_size=64, eval_every=25, max_steps=150)
    clock = Clock.of(cfg, SPLITS)
    assert clock.steps_per_pass == 63 and clock.epochs == 6
    whole = [batch_rows(train_order(cfg.seed, p, SPLITS.num_train), 64)["starts"]
             for p in (1, 2, 3)]
    every_step = np.concatenate(whole)[:150]
    pieces = [clock.train_rows(*clock.epoch_span(epoch))["starts"] for epoch in range(1, 7)]
    np.testing.assert_array_equal(np.concatenate(pieces), every_step)
    assert clock.epoch_span(6) == (125, 150)


def test_strided_windows_start_every_stride_tokens_each_once_a_pass():
    cfg = tiny_config(batch_size=64, train_stride=16)
    clock = Clock.of(cfg, SPLITS)
    rows = clock.train_rows(0, clock.steps_per_pass)
    starts = rows["starts"][rows["weights"] > 0]
    assert clock.train_windows == -(-SPLITS.num_train // 16) == len(starts)
    assert sorted(starts) == list(range(0, SPLITS.num_train, 16))


def test_the_validation_sample_is_fixed_sorted_and_the_same_for_every_seed():
    sample = validation_sample(100_000, 500)
    assert len(np.unique(sample)) == 500 and np.all(np.diff(sample) > 0)
    np.testing.assert_array_equal(sample, validation_sample(100_000, 500))
    one = Clock.of(tiny_config(eval_windows=50, seed=1), SPLITS).val_indices
    two = Clock.of(tiny_config(eval_windows=50, seed=2), SPLITS).val_indices
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(validation_sample(30, 500), np.arange(30))  # all there are


# The tiny corpus in Cyrillic and Greek letters, with Japanese for its punctuation: a text beyond
# plain English (two- and three-byte UTF-8) with the statistics of a real one.
NON_ENGLISH = str.maketrans("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?",
                            "абвгдежзийклмнопрстуфхцчшщαβγδεζηθικλμνξοπρστυφχψωςά。、：；！？")


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory, corpus_text):
    """A step-based run on a non-English text with a byte-level tokenizer learned from its
    training text (budget 11 steps, evaluations every 4 on 30 windows, stride 2, checkpoints
    every 3 steps) straight through, and the same stopped at step 7 (mid-epoch, after
    checkpoints of its own at 3 and 6) and resumed."""
    root = tmp_path_factory.mktemp("steps")
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text[:TINY_CHARS].translate(NON_ENGLISH), encoding="utf-8")
    toml = tiny_toml_file(root / "steps.toml", max_steps=11, eval_every=4, eval_windows=30,
                          train_stride=2, lr=0.01, early_stop_patience=10,
                          tokenizer="byte_bpe", vocab_size=300, tokenizer_text="train")
    common = [str(toml), "--data", str(corpus), "--no-progress",
              "--steps-per-chunk", "2", "--checkpoint-every", "3", "--log-every", "1"]
    assert train_main([*common, "--out", str(root / "straight")]) == 0
    assert train_main([*common, "--out", str(root / "split"), "--stop-at-step", "7"]) == 0
    assert train_main([*common, "--out", str(root / "split"), "--resume"]) == 0
    return root / "straight", root / "split", common


def test_a_step_budget_evaluates_every_n_steps(step_runs):
    history = RunFolder(step_runs[0]).read_history()
    assert [row["step"] for row in history] == [4, 8, 11]
    assert [row["epoch"] for row in history] == [1, 2, 3]


def test_the_budget_of_a_step_based_run_counts_its_steps(step_runs):
    (run,) = read_finished_runs([step_runs[0]])
    curve = run_curve(run)
    np.testing.assert_array_equal(curve.spent["steps"], [4, 8, 11])
    assert RunFolder(step_runs[0]).read_summary()["cpu"].endswith("cores)")


def test_a_step_based_run_stopped_mid_epoch_resumes_exactly(step_runs):
    straight, split = (RunFolder(path).read_history() for path in step_runs[:2])
    keys = ("epoch", "step", "train_loss", "val_loss", "lr")
    assert [[row[k] for k in keys] for row in straight] == [[row[k] for k in keys]
                                                            for row in split]
    one, two = (load_run(path, "latest") for path in step_runs[:2])
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_step_based_run_keeps_its_budget_on_resume(step_runs, capsys):
    """Its epochs' steps follow from the budget: a resume with another is refused, in one
    line, and changes nothing."""
    straight, _, common = step_runs
    before = (straight / "history.csv").read_bytes()
    assert train_main([*common, "--out", str(straight), "--resume", "--max-steps", "15"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_steps (11 -> 15)" in err
    assert (straight / "history.csv").read_bytes() == before


def test_checkpoints_between_evaluations_say_nothing(tmp_path, tiny_corpus, capfd):
    """A checkpoint every 2 steps is unranked by design: orbax's warning that it has no metrics
    is not shown."""
    toml = tiny_toml_file(tmp_path / "steps.toml", max_steps=5, eval_every=5)
    assert train_main([str(toml), "--data", str(tiny_corpus), "--no-progress", "--out",
                       str(tmp_path / "run"), "--steps-per-chunk", "1",
                       "--checkpoint-every", "2"]) == 0
    assert "did not provide metrics" not in capfd.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3"]
