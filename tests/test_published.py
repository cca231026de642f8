"""A published model (`run.published`): one safetensors file of the run's evaluation weights
beside its config, tokenizer, history and summary, read by `load_run`, `tinylm evaluate` and
`generate` as they read the run."""

import shutil

import jax
import numpy as np
import pytest

from tinylm_jax.analysis.evaluation import evaluate_run
from tinylm_jax.cli.analyze import analyze_main, generate_main, publish_main
from tinylm_jax.run.checkpoint import load_run


@pytest.fixture(scope="module")
def published(tiny_run, tmp_path_factory):
    run, corpus = tiny_run
    out = tmp_path_factory.mktemp("published") / "model"
    assert publish_main([str(run), "--out", str(out)]) == 0
    return run, corpus, out


def test_the_published_weights_are_the_best_checkpoint_s(published):
    run, _, out = published
    assert sorted(p.name for p in out.iterdir()) == ["attention_by_epoch.csv", "config.json",
                                                     "history.csv", "metrics.csv",
                                                     "model.safetensors", "summary.json",
                                                     "tokenizer.json"]
    best, copy = load_run(run), load_run(out)
    assert (copy.checkpoint, copy.position) == (best.checkpoint, best.position)
    for a, b in zip(jax.tree.leaves(best.params), jax.tree.leaves(copy.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_evaluate_and_generate_read_a_published_model_as_its_run(published, capsys):
    run, corpus, out = published
    assert evaluate_run(out, str(corpus)) == evaluate_run(run, str(corpus))
    assert generate_main([str(out), "--data", str(corpus), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    copy = shutil.copytree(out, out.parent / "analysed")  # `all` writes beside the weights
    assert analyze_main(["all", str(copy), "--data", str(corpus)]) == 0
    assert (copy / "samples.md").is_file() and (copy / "attention_by_epoch.png").is_file()


def test_publishing_over_a_folder_that_is_not_a_publication_is_refused(published, tmp_path,
                                                                       capsys):
    run, _, out = published
    (tmp_path / "notes.txt").write_text("mine")
    assert publish_main([str(run), "--out", str(tmp_path)]) == 2
    assert "is not a published model" in capsys.readouterr().err
    assert publish_main([str(run), "--out", str(out)]) == 0  # an earlier publication: replaced
