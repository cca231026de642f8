"""`tinylm evaluate`: a run's validation figures from its weights, nats per character counted
from the validation windows' own text."""

import json
import math

import pytest
from conftest import refused

from tinylm_jax.analysis.corpus import open_corpus
from tinylm_jax.analysis.evaluation import evaluate_run
from tinylm_jax.cli.analyze import evaluate_main


def test_evaluate_reproduces_the_runs_best_validation_figure(tiny_run, capsys):
    run, corpus = tiny_run
    summary = json.loads((run / "summary.json").read_text())
    result = evaluate_run(run, str(corpus))
    assert result.perplexity == pytest.approx(summary["best_val_ppl"], rel=1e-9)
    assert result.nats_per_token == pytest.approx(summary["best_val_loss"], rel=1e-9)
    assert evaluate_main([str(run), "--data", str(corpus)]) == 0
    assert f"validation perplexity   {summary['best_val_ppl']:.2f}" in capsys.readouterr().out


def test_nats_per_character_counts_each_windows_own_text(tiny_run):
    """Characters worked window by window from the text: each target token's span from the end
    of the token before it, whitespace included."""
    run, corpus_path = tiny_run
    corpus = open_corpus(run, str(corpus_path))
    seq_len = corpus.config.seq_len
    offsets = corpus.tokenizer.encode(corpus.text).offsets  # the whole text's, at once
    chars = 0
    for start in corpus.splits.validation_starts():
        first, last = offsets[start][1], offsets[start + seq_len][1]
        chars += len(corpus.text[first:last])
    result = evaluate_run(run, str(corpus_path))
    assert result.chars == chars
    assert result.tokens == corpus.splits.num_val * seq_len
    assert result.nats_per_char == pytest.approx(result.loss_sum / chars)
    assert 1 < result.chars / result.tokens < 10  # a BPE token is a few characters
    assert math.isclose(result.perplexity, math.exp(result.nats_per_token))


def test_evaluate_refuses_a_folder_that_is_not_a_run_in_one_line(tmp_path, capsys):
    line = refused(evaluate_main, [str(tmp_path)], capsys, watch=tmp_path)
    assert "not a run folder" in line
