"""The command line end to end, on a tiny experiment and a slice of the corpus."""

import csv
import json
import math
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, TINY_CHARS, refused, snapshot, tiny_toml_file

from tinylm_jax.analysis.runs import comparison_table, epoch_table
from tinylm_jax.cli.run_experiment import main
from tinylm_jax.core.metrics import perplexity
from tinylm_jax.run.checkpoint import load_run
from tinylm_jax.run.folder import OPTIONAL_SUMMARY_FIELDS, SUMMARY_FIELDS


def _run(toml, corpus, out, *extra):
    return main([str(toml), "--data", str(corpus), "--out", str(out), "--no-progress", *extra])


def _history(run_dir):
    with (run_dir / "history.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus_text):
    """(run folder, toml, corpus): the tiny experiment's four epochs straight through (it stops
    early after them: 3 epochs without a better PPL than epoch 1's)."""
    root = tmp_path_factory.mktemp("straight")
    toml = tiny_toml_file(root / "tiny.toml")
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text[:TINY_CHARS], encoding="utf-8")
    out = root / "run"
    assert _run(toml, corpus, out) == 0
    return out, toml, corpus


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A copy of the shared two-epoch run folder, for a test that writes into it."""
    return shutil.copytree(tiny_run[0], tmp_path / "run")


def test_train_then_resume_equals_a_straight_run(straight, tmp_path, capsys):
    """Stopped at an epoch's end and resumed: the plateau's state, the history and the params
    carry over (a resume from mid-epoch is test_reliability's SIGTERM test)."""
    straight, toml, corpus = straight
    split = tmp_path / "split"
    assert _run(toml, corpus, split, "--max-epochs", "2") == 0
    assert [row["epoch"] for row in _history(split)] == ["1", "2"]
    assert (split / "checkpoints" / "2").is_dir()
    assert _run(toml, corpus, split, "--resume") == 0
    assert "resumed" in capsys.readouterr().out
    # The plateau cuts after epochs 2 and 3 only show if its state survived the restart.
    assert [float(row["lr"]) for row in _history(split)] == [0.03, 0.03, 0.015, 0.0075]
    for a, b in zip(_history(straight), _history(split), strict=True):
        for key in ("train_loss", "val_loss", "lr"):
            assert a[key] == b[key]
    one, two = load_run(straight, "latest"), load_run(split, "latest")
    assert one.epoch == two.epoch == 4
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_array_equal(x, y)
    summary = json.loads((split / "summary.json").read_text())
    # What every reader may rely on, and what runs of this version add.
    assert sorted(summary) == sorted(SUMMARY_FIELDS + OPTIONAL_SUMMARY_FIELDS)
    assert summary["epochs_run"] == 4 and summary["param_count"] > 0
    assert summary["best_val_ppl"] == pytest.approx(min(float(r["val_ppl"])
                                                        for r in _history(split)))


def test_best_and_latest_are_both_kept(straight):
    out = straight[0]
    history = _history(out)
    best = min(history, key=lambda row: float(row["val_loss"]))
    best_run, latest_run = load_run(out, "best"), load_run(out, "latest")
    assert (best_run.epoch, latest_run.epoch) == (int(best["epoch"]), len(history)) == (1, 4)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == \
        [1, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] == 1
    assert summary["stopped_early"] is True  # 3 epochs without a better PPL after epoch 1


def test_an_existing_run_folder_is_never_silently_overwritten(tiny_run_copy, tiny_toml,
                                                             tiny_corpus, capsys):
    out = tiny_run_copy
    before = (out / "history.csv").read_bytes()
    assert _run(tiny_toml, tiny_corpus, out, "--max-epochs", "1") == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "history.csv").read_bytes() == before
    assert _run(tiny_toml, tiny_corpus, out, "--max-epochs", "1", "--overwrite") == 0
    assert [row["epoch"] for row in _history(out)] == ["1"]  # replaced, not continued


def test_resuming_with_another_config_is_refused(tiny_run, tiny_toml, capsys):
    out, tiny_corpus = tiny_run
    before = snapshot(out)
    assert _run(tiny_toml, tiny_corpus, out, "--resume", "--seed", "7") == 2
    assert "seed (0 -> 7)" in capsys.readouterr().err
    assert _run(tiny_toml, tiny_corpus, out, "--resume", "--max-steps-per-epoch", "3") == 2
    assert "--max-steps-per-epoch (None -> 3)" in capsys.readouterr().err
    assert snapshot(out) == before


WORDS = ("to be or not that is the question whether tis nobler in the mind to suffer "
         "the slings and arrows of outrageous fortune").split()


@pytest.fixture
def synthetic_corpus(tmp_path):
    """A valid corpus of about 2,700 tokens, on which the tiny experiment passes --dry-run: bad
    input needs no real corpus, as every case fails before training."""
    path = tmp_path / "corpus.txt"
    lines = (" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(9)) for i in range(300))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _edit(tmp, corpus, **changes):
    return tiny_toml_file(tmp / "bad.toml", **changes), corpus


def _write(path, content):
    path.write_bytes(content)
    return path


# One case of each kind of mistake (the many values of each kind are test_config's and
# test_data's): (experiment, corpus) from the tmp folder and a valid corpus, and the words the
# one error line must hold ("{toml}" and "{corpus}" stand for the paths).
BAD_INPUT = {
    "a-bad-value": (lambda tmp, c: _edit(tmp, c, lr=math.nan), ["'lr'", "must be finite",
                                                                  "{toml}"]),
    "an-unknown-key": (lambda tmp, c: _edit(tmp, c, dmodel=3), ["unknown key(s) dmodel",
                                                                 "{toml}"]),
    "not-toml": (lambda tmp, c: (_write(tmp / "bad.toml", b"seq_len = = 3\n"), c),
                 ["not valid TOML", "{toml}"]),
    "a-missing-file": (lambda tmp, c: (tmp / "no" / "such.toml", c),
                       ["no such experiment file", "{toml}"]),
    "an-unknown-experiment": (lambda tmp, c: ("widest", c),
                              ["unknown experiment 'widest'", "baseline, medium, wider"]),
    "an-empty-corpus": (lambda tmp, c: _edit(tmp, _write(c, b"  \n\t\r\n  ")),
                        ["{corpus}: corpus is empty"]),
    "a-short-corpus": (lambda tmp, c: _edit(tmp, _write(c, b"a " * 17)),
                       ["{corpus}: corpus too short", "17 tokens", "seq_len 16"]),
    "a-vocab-too-small": (lambda tmp, c: _edit(tmp, c, vocab_size=3),
                          ["{corpus}: vocab_size 3 is too small"]),
    "invalid-utf8": (lambda tmp, c: _edit(tmp, _write(c, b"ok \xc3\x28")),
                     ["{corpus}: not valid UTF-8 at byte offset 3"]),
    "a-corpus-folder": (lambda tmp, c: _edit(tmp, tmp),
                        ["{corpus}: corpus path is not a regular file"]),
    "config-before-corpus": (lambda tmp, c: _edit(tmp, tmp / "missing.txt", lr=math.nan),
                             ["'lr'"]),
}


@pytest.mark.parametrize("make, words", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_one_line_naming_the_field_or_file_and_writes_nothing(
        tmp_path, synthetic_corpus, capsys, make, words):
    experiment, corpus = make(tmp_path, synthetic_corpus)
    argv = [str(experiment), "--data", str(corpus), "--out", str(tmp_path / "run"),
            "--no-progress"]
    err = refused(main, argv, capsys, watch=tmp_path)
    for word in words:
        assert word.format(toml=experiment, corpus=corpus) in err
    if not corpus.exists():
        assert str(corpus) not in err  # a bad config is named before the corpus is read


def test_dry_run_reports_and_writes_nothing(tmp_path, tiny_toml, tiny_corpus, capsys):
    out = tmp_path / "run"
    assert _run(tiny_toml, tiny_corpus, out, "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "parameters: " in printed and "windows: " in printed
    assert not out.exists()


def test_all_dry_run_reports_the_three_experiments(tmp_path, corpus_path, capsys):
    assert main(["all", "--data", str(corpus_path), "--out", str(tmp_path / "runs"),
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("parameters: 391,552") == 2 and "parameters: 1,307,392" in printed
    assert "358,122 train / 89,531 validation" in printed
    assert "358,071 train / 89,518 validation" in printed
    assert not (tmp_path / "runs").exists()


def test_comparison_table_sets_ours_beside_the_reference():
    table = comparison_table({"baseline": {"experiment": "B", "best_val_ppl": 61.2,
                                           "best_epoch": 5}})
    assert "| B | 61.20 | 5 | 60.00 | 6 | +2.0% |" in table
    table = comparison_table({"gpu": {"experiment": "WiderModel_seq64_d256_lr1e-4_bs512",
                                      "best_val_ppl": 58.35, "best_epoch": 10},
                              "mine": {"experiment": "mine", "best_val_ppl": 70.0,
                                       "best_epoch": 2}})
    assert "| WiderModel_seq64_d256_lr1e-4_bs512 | 58.35 | 10 | 58.35 | 10 | +0.0% |" in table
    assert "| mine | 70.00 | 2 | - | - | - |" in table


def test_the_epoch_table_sets_each_epoch_beside_the_reference_and_bolds_each_best():
    history = [{"epoch": 1, "val_ppl": 80.0}, {"epoch": 2, "val_ppl": 66.0},
               {"epoch": 3, "val_ppl": 66.5}]
    table = epoch_table(history, (78.06, 67.09, 62.34, 60.94))
    assert "| 1 | 80.00 | 78.06 | +2.5% |" in table
    assert "| 2 | **66.00** | 67.09 | -1.6% |" in table
    assert "| 4 |  | **60.94** |  |" in table
    longer = epoch_table([*history, {"epoch": 5, "val_ppl": 65.0}], (78.06, 67.09))
    assert "| 3 | 66.50 |  |  |" in longer and "| 5 | **65.00** |  |  |" in longer


def test_the_script_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "scripts/run_experiment.py", "nosuch",
                             "--out", str(tmp_path / "x")], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown experiment") and result.stderr.count("\n") == 1


def test_resume_needs_a_complete_run_folder(tmp_path, tiny_run_copy, tiny_toml, tiny_corpus,
                                           capsys):
    assert _run(tiny_toml, tiny_corpus, tmp_path / "empty", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    out = tiny_run_copy
    (out / "tokenizer.json").unlink()
    assert _run(tiny_toml, tiny_corpus, out, "--resume") == 2
    assert "no tokenizer.json" in capsys.readouterr().err


@pytest.mark.parametrize("max_epochs", ["2", "1"])
def test_resuming_a_run_that_has_ended_changes_none_of_its_files(tiny_run_copy, tiny_toml,
                                                                  tiny_corpus, capsys,
                                                                  max_epochs):
    """Nothing is left to train, so the files stay those of the sessions that trained: the
    summary's wall time and versions, and the config even when the resume asks for a protocol
    it has already passed (a set resumed after its first member ended resumes that member)."""
    out = tiny_run_copy  # its two epochs ended the protocol
    before = snapshot(out)
    assert _run(tiny_toml, tiny_corpus, out, "--max-epochs", max_epochs, "--resume") == 0
    assert "nothing left to train (its protocol has ended)" in capsys.readouterr().out
    assert snapshot(out) == before


@pytest.mark.parametrize("damaged", ["{ cut off", "{}", '{"experiment": "tiny"}', "[]"])
def test_a_resume_writes_the_unreadable_summary_of_an_ended_run_anew(tiny_run_copy, tiny_toml,
                                                                       tiny_corpus, damaged):
    """The same summary as the training wrote: the wall time comes from the last checkpoint."""
    out = tiny_run_copy
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(damaged)
    assert _run(tiny_toml, tiny_corpus, out, "--max-epochs", "2", "--resume") == 0
    assert json.loads((out / "summary.json").read_text()) == summary


def test_all_runs_the_three_and_resumes_what_is_missing(tmp_path, tiny_corpus, monkeypatch,
                                                        capsys):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    for name in ("baseline", "medium", "wider"):
        tiny_toml_file(experiments / f"{name}.toml", num_epochs=1)
    monkeypatch.setattr("tinylm_jax.core.config.EXPERIMENTS_DIR", experiments)
    root = tmp_path / "runs"
    argv = ["all", "--data", str(tiny_corpus), "--out", str(root), "--no-progress"]
    assert main(argv) == 0
    table = (root / "comparison.md").read_text()
    assert table.count("| tiny |") == 3 and "| 60.00 | 6 |" in table
    shutil.rmtree(root / "wider")
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert capsys.readouterr().out.count("resumed") == 2
    assert (root / "wider" / "summary.json").is_file()


def test_a_seed_set_resumes_and_each_member_equals_its_run_alone(tmp_path, tiny_toml,
                                                                 tiny_corpus, capsys):
    """--seeds 0-1 stopped inside its first member and resumed: both members finish, each equal
    to a run of that seed alone (same history, same parameters), and the two differ."""
    short = ("--max-epochs", "1", "--max-steps-per-epoch", "6", "--steps-per-chunk", "2")
    root = tmp_path / "set"
    assert _run(tiny_toml, tiny_corpus, root, "--seeds", "0-1", *short, "--stop-at-step",
                "4") == 0
    assert sorted(p.name for p in root.iterdir()) == ["seed-0"]
    assert _run(tiny_toml, tiny_corpus, root, "--seeds", "0-1", *short, "--resume") == 0
    assert capsys.readouterr().out.count("resumed") == 1  # seed-1 had not started
    histories = []
    for seed in (0, 1):
        alone = tmp_path / f"alone-{seed}"
        assert _run(tiny_toml, tiny_corpus, alone, "--seed", str(seed), *short) == 0
        member = root / f"seed-{seed}"
        assert json.loads((member / "config.json").read_text())["experiment"]["seed"] == seed
        histories.append(_history(member))
        assert [(r["train_loss"], r["val_loss"]) for r in histories[-1]] == \
            [(r["train_loss"], r["val_loss"]) for r in _history(alone)]
        for x, y in zip(jax.tree.leaves(load_run(member, "latest").params),
                        jax.tree.leaves(load_run(alone, "latest").params), strict=True):
            np.testing.assert_array_equal(x, y)
    assert histories[0][0]["train_loss"] != histories[1][0]["train_loss"]


def test_dry_run_ignores_an_existing_run_folder(tiny_run, tiny_toml, capsys):
    out, tiny_corpus = tiny_run
    before = snapshot(out)
    assert _run(tiny_toml, tiny_corpus, out, "--dry-run", "--seed", "5") == 0
    assert "seed = 5" in capsys.readouterr().out
    assert snapshot(out) == before


def test_overwrite_only_replaces_a_run_folder(tmp_path, tiny_toml, tiny_corpus, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "config.json").write_text("my own notes, not a run")
    assert _run(tiny_toml, tiny_corpus, out, "--overwrite") == 2
    assert "unreadable run config" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "my own notes, not a run"


def test_resuming_on_another_corpus_is_refused(tiny_run, tiny_toml, tiny_corpus, capsys):
    out = tiny_run[0]
    before = snapshot(out)
    tiny_corpus.write_text(tiny_corpus.read_text() + "\nEXTRA:\nMore lines.\n")  # the test's own
    assert _run(tiny_toml, tiny_corpus, out, "--resume") == 2
    assert "corpus (its sha256 differs)" in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.parametrize("argv, message", [
    (["baseline", "--precision", "fp16"], "invalid choice: 'fp16'"),
    (["baseline", "--max-epochs", "x"], "invalid int value: 'x'"),
    ([], "the following arguments are required: experiment"),
])
def test_usage_mistakes_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--max-epochs", "0"], "--max-epochs must be positive"),
    (["--seed", str(2**64)], "--seed must lie in"),
    (["--max-steps-per-epoch", "0"], "--max-steps-per-epoch must be positive"),
    (["--resume", "--overwrite"], "exclude each other"),
    (["--seed", "1", "--seeds", "0-2"], "--seed and --seeds exclude each other"),
    (["--seeds", "2-1"], "the range 2-1 is empty"),
])
def test_bad_flag_values_name_the_flag(tmp_path, tiny_toml, tiny_corpus, capsys, flags, message):
    assert _run(tiny_toml, tiny_corpus, tmp_path / "never", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_a_diverging_loss_has_an_infinite_perplexity():
    assert perplexity(1000.0) == float("inf") and perplexity(0.0) == 1.0
