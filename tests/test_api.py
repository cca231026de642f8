"""The Python API at the package's top: train, train_seeds and load_run on the tiny experiment."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

import tinylm_jax
from tinylm_jax.run.loop import StopReason

SHORT = {"num_epochs": 2, "max_steps_per_epoch": 3, "progress": False}


def test_train_runs_the_protocol_and_returns_the_run(tmp_path, tiny_corpus):
    run = tinylm_jax.train(tiny_config(), tmp_path / "run", data=str(tiny_corpus), lr=0.01,
                           **SHORT)
    assert run.stop.reason == StopReason.FINISHED and run.config.lr == 0.01
    assert [row["epoch"] for row in run.history] == [1, 2]
    assert run.summary["best_epoch"] in (1, 2) and run.summary["epochs_run"] == 2
    assert (run.folder / "attention_by_epoch.csv").is_file()  # what the command line records
    loaded = tinylm_jax.load_run(run.folder)
    assert loaded.history == run.history and loaded.summary == run.summary
    assert loaded.stop is None
    latest, best = loaded.latest_params, loaded.best_params
    assert jax.tree.structure(latest) == jax.tree.structure(best)
    assert (np.array_equal(latest["head"]["kernel"], best["head"]["kernel"])
            == (run.summary["best_epoch"] == 2))


def test_a_stopped_run_has_no_summary_and_resumes(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    stopped = tinylm_jax.train(tiny_config(), out, data=str(tiny_corpus), stop_at_step=4, **SHORT)
    assert stopped.stop.reason == StopReason.STOP_AT_STEP and stopped.summary is None
    assert len(stopped.history) == 1
    done = tinylm_jax.train(tiny_config(), out, data=str(tiny_corpus), resume=True, **SHORT)
    assert done.stop.reason == StopReason.FINISHED and len(done.history) == 2


def test_train_seeds_trains_a_set_of_member_folders(tmp_path, tiny_corpus):
    runs = tinylm_jax.train_seeds(tiny_config(), tmp_path / "set", "3-4", data=str(tiny_corpus),
                                  **SHORT)
    assert [run.folder.name for run in runs] == ["seed-3", "seed-4"]
    assert [run.config.seed for run in runs] == [3, 4]
    assert runs[0].history[0]["train_loss"] != runs[1].history[0]["train_loss"]


@pytest.mark.parametrize("overrides, message", [
    ({"learning_rate": 0.1}, r"unknown override\(s\) learning_rate"),
    ({"lr": -1.0}, "'lr' must be positive"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
])
def test_bad_overrides_are_refused_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(tinylm_jax.UserError, match=message):
        tinylm_jax.train("baseline", tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()
