"""Run folders written before the package took its layers still resume and analyse.

`data/run_folder_5c8d9d7` was written by commit 5c8d9d7 (the flat package): the tiny experiment
of `tiny.toml` on the first 8,000 characters of the corpus, `--max-steps-per-epoch 6
--steps-per-chunk 2 --stop-at-step 9`, so it stopped 3 steps into epoch 2 with checkpoints 1 (end
of epoch 1) and 2 (the stop). Regenerate it only with that commit's code.
"""

import shutil
from pathlib import Path

import pytest

from tinylm_jax.cli.analyze import analyze_main
from tinylm_jax.cli.run_experiment import main
from tinylm_jax.run.folder import RunFolder

OLD = Path(__file__).resolve().parent / "data" / "run_folder_5c8d9d7"
# Epoch 2 as commit 5c8d9d7 itself finished it when it resumed that folder, on the Intel
# (Sapphire Rapids) machine that wrote it. Today's code reproduces these bitwise there. Bitwise
# equality does not carry across CPUs: XLA:CPU picks its kernels, and so its summation orders,
# for the CPU it runs on. On an AMD EPYC (Zen 5) both losses came out 2e-8 (relative) away.
# A resume from the wrong position or without its optimiser state moves the epoch's mean loss
# by orders of magnitude more than 1e-6: here the loss falls by about 0.06 a step (epoch 1's
# mean 4.56, epoch 2's 4.21, six steps each), so 1e-6 still tells a faithful resume from a
# wrong one.
OLD_CODE_EPOCH_2 = {"train_loss": 4.207161903381348, "val_loss": 4.334555666787284}
ACROSS_CPUS = 1e-6


def test_a_folder_from_the_flat_package_resumes_as_its_own_code_resumed_it(tmp_path, corpus_text,
                                                                          capsys):
    run = tmp_path / "run"
    shutil.copytree(OLD / "run", run)
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(corpus_text[:8000], encoding="utf-8")
    assert main([str(OLD / "tiny.toml"), "--data", str(corpus), "--out", str(run),
                 "--no-progress", "--max-steps-per-epoch", "6", "--steps-per-chunk", "2",
                 "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    history = RunFolder(run).read_history()
    assert [row["epoch"] for row in history] == [1, 2]
    for key, old_code_value in OLD_CODE_EPOCH_2.items():
        assert history[1][key] == pytest.approx(old_code_value, rel=ACROSS_CPUS)
    assert analyze_main(["curves", str(run)]) == 0
    assert analyze_main(["attention-epochs", str(run)]) == 0
