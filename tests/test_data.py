from collections import Counter

import numpy as np
import pytest

from tinylm_jax.core.config import UserError, load_config
from tinylm_jax.core.data import (
    Splits,
    batches,
    build_dataset,
    download_corpus,
    read_corpus,
    resolve_corpus,
    train_order,
)


def test_corpus_statistics(corpus_text):
    assert len(corpus_text) == 1_115_394
    assert len(set(corpus_text)) == 65


@pytest.fixture(scope="module")
def real_dataset(corpus_text):
    return build_dataset(corpus_text, load_config("baseline"))


def test_bpe_gives_the_reference_token_count(real_dataset):
    assert real_dataset.tokenizer.get_vocab_size() == 500
    assert real_dataset.splits.num_tokens == 447_717
    counts = Counter(np.asarray(real_dataset.tokens).tolist())
    top = [(real_dataset.tokenizer.id_to_token(i), n) for i, n in counts.most_common(2)]
    assert top == [(",", 19_846), ("s", 11_828)]  # the reference's figure 1


@pytest.mark.parametrize("seq_len, train, val", [(64, 358_122, 89_531), (128, 358_071, 89_518)])
def test_window_counts_match_the_reference(real_dataset, seq_len, train, val):
    splits = Splits.of(real_dataset.splits.num_tokens, seq_len, 0.8)
    assert (splits.num_train, splits.num_val) == (train, val)


def test_too_short_corpus_is_refused():
    with pytest.raises(UserError, match="corpus too short"):
        Splits.of(65, 64, 0.8)


def test_batches_pad_the_last_one_and_cover_every_window_once():
    starts = np.arange(10, dtype=np.int32)
    out = list(batches(starts, 4))
    assert [b["starts"].shape for b in out] == [(4,)] * 3
    np.testing.assert_array_equal(out[-1]["weights"], [1, 1, 0, 0])
    real = np.concatenate([b["starts"][b["weights"] > 0] for b in out])
    np.testing.assert_array_equal(real, starts)


def test_train_order_is_a_pure_function_of_seed_and_epoch():
    first = train_order(0, 1, 1000)
    assert sorted(first.tolist()) == list(range(1000))
    np.testing.assert_array_equal(first, train_order(0, 1, 1000))
    assert not np.array_equal(first, train_order(0, 2, 1000))
    assert not np.array_equal(first, train_order(1, 1, 1000))


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello \xff world")
    with pytest.raises(UserError, match="byte offset 6"):
        read_corpus(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "not found"),
    (lambda p: p.mkdir() or p, "not a regular file"),
    (lambda p: p.write_text("  \n") and p, "empty"),
])
def test_unusable_corpus_paths(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        read_corpus(make(tmp_path / "corpus"))


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_DATA", "/from/env.txt")
    assert str(resolve_corpus("given.txt")) == "given.txt"
    assert str(resolve_corpus(None)) == "/from/env.txt"


def test_download_is_verified(tmp_path, corpus_path):
    dest = tmp_path / "cache" / "input.txt"
    download_corpus(dest, url=corpus_path.as_uri())
    assert dest.read_bytes() == corpus_path.read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("not shakespeare")
    with pytest.raises(UserError, match="sha256"):
        download_corpus(tmp_path / "cache2" / "input.txt", url=other.as_uri())
    assert not (tmp_path / "cache2" / "input.txt").exists()
    assert list((tmp_path / "cache2").iterdir()) == []


def test_offline_without_corpus_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYLM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("tinylm_jax.core.data.CORPUS_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(UserError, match="--data PATH.*TINYLM_DATA.*download"):
        resolve_corpus(None)


def test_a_vocab_smaller_than_the_alphabet_is_refused(corpus_text):
    with pytest.raises(UserError, match="vocab_size 20 is too small"):
        build_dataset(corpus_text[:5000], load_config("baseline").replace(vocab_size=20))
