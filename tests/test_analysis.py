"""Tokenizer study on the real corpus, decoding, attention statistics and the export format."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from tinylm_jax.analysis.attention import (
    JS_DISTANCE_MAX,
    AttentionExport,
    js_distance,
    load_attention,
)
from tinylm_jax.analysis.attention_stats import (
    is_punctuation,
    stats_rows,
    uniform_causal,
    window_statistics,
)
from tinylm_jax.analysis.budget import BudgetCurve, budget_markdown, reference_curve
from tinylm_jax.analysis.corpus import RunCorpus
from tinylm_jax.analysis.detokenize import Spacing, reference_separator
from tinylm_jax.analysis.plots import token_label
from tinylm_jax.analysis.tokenizer_study import md_token, tokenizer_study
from tinylm_jax.core.config import UserError, load_config
from tinylm_jax.core.data import train_tokenizer
from tinylm_jax.reference.table1 import REFERENCE_TABLE1, REFERENCE_VAL_PPL


@pytest.fixture(scope="module")
def real_corpus(corpus_text):
    return RunCorpus.build(load_config("baseline"), train_tokenizer(corpus_text, 500),
                           corpus_text)


def test_tokenizer_study_matches_the_reference(real_corpus):
    study = tokenizer_study(real_corpus)
    assert (study.num_chars, study.distinct_chars, study.num_tokens) == (1_115_394, 65, 447_717)
    assert study.top_tokens[0] == (",", 19_846) and study.top_tokens[19] == ("be", 3_568)
    assert [tok for tok, _ in study.top_tokens[:5]] == [",", "s", ":", ".", "I"]
    assert len(study.top_words) == 100
    assert study.missed_words == ["duke", "richard", "queen"]  # 97 captured


def test_the_spacing_model_restores_the_validation_text_better_than_the_reference(real_corpus):
    scores = tokenizer_study(real_corpus).spacing_scores
    assert scores["spacing_exact"] > 0.9 > 0.5 > scores["reference_exact"]
    start = real_corpus.window_start(0)
    ids = real_corpus.ids[start:start + 16]
    assert real_corpus.source_text(start, 16) == "o'erweighs your true.\n\nISABELLA:"
    assert real_corpus.decode(ids).startswith("o'er")
    assert "ISABELLA:" in real_corpus.decode(ids)


def test_spacing_learns_the_commonest_separator_per_pair():
    text = "ab ab ab,ab\nxy"
    ids = np.array([0, 1, 0, 1, 0, 1, 2, 0, 1, 3, 4])  # a b a b a b , a b x y
    starts = [0, 1, 3, 4, 6, 7, 8, 9, 10, 12, 13]
    offsets = np.array([[s, s + 1] for s in starts])
    spacing = Spacing.fit(text, ids, offsets, vocab_size=6)
    assert spacing.separator(0, 1) == ""  # a|b always joined
    assert spacing.separator(1, 0) == " "  # b a: twice " ", never anything else
    assert spacing.separator(1, 3) == "\n"
    assert spacing.separator(5, 1) == ""  # unseen pair: what most often precedes b
    assert spacing.separator(5, 5) == " "  # unseen token: a space

    class Vocab:
        def id_to_token(self, i):
            return "ab,xy?"[i]

    assert spacing.decode(Vocab(), [0, 1, 0, 1, 3]) == "ab ab\nx"
    assert spacing.decode(Vocab(), [0, 1], after=1) == " ab"


def test_reference_separator_is_its_punctuation_clean_up():
    assert reference_separator("thee", ",") == "" and reference_separator("(", "I") == ""
    assert reference_separator("lo", "se") == " " and reference_separator("I", ")") == ""


def test_punctuation_tokens_and_labels():
    assert is_punctuation(",") and is_punctuation("':") and not is_punctuation("s")
    assert not is_punctuation("[PAD]") and not is_punctuation("")
    assert token_label("$") == r"\$" and md_token("a|b") == "`a\\|b`"


def _stats(weights, punct=None):
    weights = jnp.asarray(weights, jnp.float32)
    length = weights.shape[-1]
    punct = jnp.zeros((1, length), bool) if punct is None else jnp.asarray(punct)
    return {k: float(v[0, 0]) for k, v in window_statistics(weights[None, None], punct).items()}


def test_statistics_of_identity_attention():
    stats = _stats(np.eye(6))
    assert stats == {"mean_distance": 0.0, "self_mass": 1.0, "prev_mass": 0.0,
                     "punct_mass": 0.0, "entropy": 0.0}


def test_statistics_of_previous_token_attention():
    length = 5
    weights = np.eye(length, k=-1)
    weights[0, 0] = 1.0  # the first query can only see itself
    stats = _stats(weights, punct=np.array([[True, False, False, False, False]]))
    assert stats["prev_mass"] == 1.0
    assert stats["mean_distance"] == pytest.approx((length - 1) / length)
    assert stats["self_mass"] == pytest.approx(1 / length)
    assert stats["punct_mass"] == pytest.approx(2 / length)  # queries 0 and 1 look at key 0
    assert stats["entropy"] == 0.0


def test_statistics_of_uniform_causal_attention():
    length = 8
    stats = _stats(np.asarray(uniform_causal(1, length))[0, 0])
    q = np.arange(length)
    assert stats["mean_distance"] == pytest.approx(np.mean(q / 2))
    assert stats["self_mass"] == pytest.approx(np.mean(1 / (q + 1)))
    assert stats["entropy"] == pytest.approx(np.mean(np.log(q + 1)), rel=1e-5)
    assert stats["prev_mass"] == pytest.approx(np.mean(1 / (q[1:] + 1)))
    punct = _stats(np.asarray(uniform_causal(1, length))[0, 0], np.arange(length)[None] == 0)
    assert punct["punct_mass"] == pytest.approx(stats["self_mass"])  # key 0: 1/(q+1) as well


def test_stats_rows_add_layer_means_and_the_reference():
    heads = {name: np.arange(6, dtype=float).reshape(2, 3) for name in
             ("mean_distance", "self_mass", "prev_mass", "punct_mass", "entropy")}
    rows = stats_rows(heads, {name: -1.0 for name in heads})
    assert len(rows) == 2 * 3 + 2 + 1
    assert rows[6] == {"layer": "0", "head": "mean", **{name: 1.0 for name in heads}}
    assert rows[-1]["layer"] == "uniform" and rows[-1]["entropy"] == -1.0


def test_an_export_is_plain_numpy(tmp_path):
    attention = np.tril(np.ones((2, 3, 4, 4), np.float32))
    attention /= attention.sum(-1, keepdims=True)
    export = AttentionExport(np.arange(4, dtype=np.int32), np.array(["a", ",", "b", "$"]),
                             attention, {"experiment": "x", "epoch": 3})
    path = tmp_path / "a.npz"
    export.save(path)
    with np.load(path, allow_pickle=False) as f:  # without the project
        assert f["attention"].shape == (2, 3, 4, 4) and f["tokens"].tolist()[3] == "$"
        assert json.loads(str(f["metadata"]))["epoch"] == 3
    again = load_attention(path)
    np.testing.assert_array_equal(again.attention, attention)


def test_loading_something_else_is_a_user_error(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="missing attention, metadata, token_ids, tokens"):
        load_attention(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="cannot read attention export"):
        load_attention(tmp_path / "junk.npz")
    with pytest.raises(UserError, match="cannot read"):
        load_attention(tmp_path / "absent.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(UserError, match="a single array"):
        load_attention(tmp_path / "single.npy")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "other.npz").read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read attention export"):
        load_attention(tmp_path / "cut.npz")
    np.savez(tmp_path / "bad.npz", token_ids=np.zeros(3), tokens=np.array(["a"] * 3),
             attention=np.zeros((1, 1, 2, 2)), metadata=np.array("{}"))
    with pytest.raises(UserError, match=r"expected \(layers, heads, 3, 3\)"):
        load_attention(tmp_path / "bad.npz")


def test_window_index_is_checked(real_corpus):
    assert real_corpus.window_start(0) == 358_122
    with pytest.raises(UserError, match=r"--window must lie in \[0, 89530\]"):
        real_corpus.window_start(89_531)
    assert len(real_corpus.ids) == 447_717


def _one_hot_against_uniform(keys: int) -> float:
    """The JS distance between attention on one key and uniform attention over `keys` keys, by
    hand: the mixture puts (1 + 1/n) / 2 on that key and 1 / (2n) on each other."""
    n = keys
    kl_one_hot = np.log(2 * n / (n + 1))
    kl_uniform = np.log(2 / (n + 1)) / n + (n - 1) / n * np.log(2)
    return float(np.sqrt((kl_one_hot + kl_uniform) / 2))


def test_the_js_distance_is_zero_for_equal_rows_and_known_for_one_hot_against_uniform():
    uniform = np.full(4, 0.25, np.float32)
    one_hot = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    assert float(js_distance(uniform, uniform)) == 0.0
    assert float(js_distance(one_hot, uniform)) == pytest.approx(_one_hot_against_uniform(4),
                                                                 rel=1e-5)
    assert _one_hot_against_uniform(2) == pytest.approx(np.sqrt(0.75 * np.log(4 / 3)))
    disjoint = float(js_distance(one_hot, np.array([0.0, 0.5, 0.5, 0.0], np.float32)))
    assert disjoint == pytest.approx(JS_DISTANCE_MAX, rel=1e-6)


def test_the_js_distance_of_causal_rows_counts_only_the_keys_each_query_sees():
    length = 6
    previous = np.eye(length, k=-1, dtype=np.float32)
    previous[0, 0] = 1.0  # the first query can only see itself
    uniform = np.asarray(uniform_causal(1, length))[0, 0]
    per_query = np.asarray(js_distance(previous, uniform))
    expected = [_one_hot_against_uniform(q + 1) for q in range(length)]  # q + 1 keys seen
    np.testing.assert_allclose(per_query, expected, rtol=1e-5, atol=1e-7)
    assert per_query[0] == 0.0 and float(js_distance(uniform, previous).mean()) == pytest.approx(
        float(per_query.mean()))


def test_table_1_is_the_minimum_of_each_of_the_reference_curves():
    for name, (best, epoch) in REFERENCE_TABLE1.items():
        curve = REFERENCE_VAL_PPL[name]
        assert (min(curve), curve.index(min(curve)) + 1) == (best, epoch)


def test_the_reference_curves_are_placed_on_its_own_windows():
    baseline, medium = reference_curve("baseline"), reference_curve("medium")
    assert baseline.spent["tokens"][0] == 358_122 * 64
    assert medium.spent["tokens"][0] == 358_071 * 128
    assert baseline.spent["steps"][-1] == 7 * 700 and "seconds" not in baseline.spent
    assert baseline.best == (60.00, 6)


def _curve(label, ppl, tokens, seconds=None):
    spent = {"tokens": np.array(tokens, float), "flops": 10 * np.array(tokens, float),
             "steps": np.arange(1, len(ppl) + 1)}
    if seconds is not None:
        spent["seconds"] = np.array(seconds, float)
    return BudgetCurve(label, "cpu, float32", np.array(ppl, float), spent)


def test_the_perplexity_within_a_budget_is_the_best_of_the_epochs_finished_in_it():
    curve = _curve("a", [5.0, 3.0, 4.0], [10, 20, 30])
    assert curve.within("tokens", 5) is None
    assert curve.within("tokens", 25) == (3.0, 2) and curve.within("tokens", 30) == (3.0, 3)
    assert curve.best == (3.0, 2)


def test_the_budget_table_compares_runs_at_the_most_every_run_spent():
    short = _curve("short", [70.0, 60.0], [100, 200], seconds=[10, 20])
    long_epochs = _curve("long", [65.0], [300], seconds=[30])
    reference = _curve("reference report: baseline", [80.0, 62.0, 61.0], [150, 300, 450])
    table = budget_markdown([short, long_epochs], [reference], "budget.png")
    assert "| PPL at 20 s | PPL at 200 tokens | PPL at 2.00e+03 FLOPs |" in table
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert rows["short"].endswith("| 60.00 (2 ep.) | 60.00 (2 ep.) | 60.00 (2 ep.) |")
    assert rows["short"].startswith("| short | cpu, float32 | 2 | 6.0 | 60.00 (2) |")
    assert rows["long"].endswith("| 2.0 | 65.00 (1) | - | - | - |")  # its one epoch is longer
    assert rows["reference report: baseline"].endswith("| - | 80.00 (1 ep.) | 80.00 (1 ep.) |")
    assert "different hardware" not in table
