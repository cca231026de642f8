"""The corpus, its BPE and its windows: the reference's counts, the data order, where the corpus
is found, and every corpus that must be refused, each with a message naming the file."""

import os
from collections import Counter
from pathlib import Path

import conftest
import numpy as np
import pytest
from conftest import TINY, tiny_config

from tinylm_jax.core.config import ExperimentConfig, UserError, load_config
from tinylm_jax.core.data import (
    Splits,
    batches,
    build_dataset,
    default_cache_path,
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


def test_the_tests_find_the_corpus_in_the_package_s_cache_and_say_when_there_is_none(
        tmp_path, monkeypatch, corpus_path):
    """With no TINYLM_DATA and no shared copy, as on a fresh clone: the cache the package
    downloads into serves the suite; offline with an empty cache, the reason comes back."""
    monkeypatch.delenv("TINYLM_DATA", raising=False)
    monkeypatch.setattr(conftest, "SHARED_CORPUS", tmp_path / "no-shared" / "input.txt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("tinylm_jax.core.data.CORPUS_URL", "http://127.0.0.1:9/input.txt")
    assert conftest.find_corpus()[0] is None and "download" in conftest.find_corpus()[1]
    cached = default_cache_path()
    cached.parent.mkdir(parents=True, exist_ok=True)  # the failed download made it
    cached.write_bytes(corpus_path.read_bytes())
    assert conftest.find_corpus() == (cached, "")


def test_offline_without_corpus_names_the_three_ways(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYLM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("tinylm_jax.core.data.CORPUS_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(UserError, match="--data PATH.*TINYLM_DATA.*download"):
        resolve_corpus(None)


def test_a_vocab_smaller_than_the_alphabet_is_refused(corpus_text):
    with pytest.raises(UserError, match="vocab_size 20 is too small"):
        build_dataset(corpus_text[:5000], load_config("baseline").replace(vocab_size=20))


# --- corpora that must be refused --------------------------------------------------------------

SEQ_LEN = TINY["seq_len"]


def _corpus_refused(path: Path, *names: str, cfg: ExperimentConfig | None = None) -> str:
    """The corpus at `path` is refused (read, then split for `cfg`) with a message naming each
    of `names`; returned. The command line prefixes a splitting error with the path."""
    with pytest.raises(UserError) as refusal:
        build_dataset(read_corpus(path), cfg or tiny_config())
    message = str(refusal.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\t\r\n  "],
                         ids=["empty", "newline", "whitespace"])
def test_an_empty_corpus_is_named(tmp_path, content):
    data = tmp_path / "empty.txt"
    data.write_bytes(content)
    _corpus_refused(data, f"{data}: corpus is empty")


@pytest.mark.parametrize("tokens", [1, SEQ_LEN - 1, SEQ_LEN, SEQ_LEN + 1])
def test_a_corpus_of_at_most_seq_len_plus_one_tokens_is_too_short(tmp_path, tokens):
    # One window needs seq_len + 1 tokens, and the split needs one window for each side.
    data = tmp_path / "short.txt"
    data.write_text(" ".join(["a"] * tokens) + "\n", encoding="utf-8")
    _corpus_refused(data, "corpus too short", f"{tokens} tokens", f"seq_len {SEQ_LEN}")


def test_seq_len_plus_one_characters_are_too_short(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("abcdefghijklmnopq"[:SEQ_LEN + 1], encoding="utf-8")
    _corpus_refused(data, "corpus too short", f"seq_len {SEQ_LEN}")


def test_seq_len_plus_two_tokens_are_enough():
    """The boundary of the cases above: two windows, one to train and one to validate."""
    splits = build_dataset(" ".join(["a"] * (SEQ_LEN + 2)) + "\n", tiny_config()).splits
    assert (splits.num_train, splits.num_val) == (1, 1)


INVALID_UTF8 = {
    "first-byte": (b"\xff rest of the text", 0),
    "latin1": (b"caf\xe9 au lait", 3),
    "after-multibyte": ("é".encode() * 5 + b"\x80 and more", 10),  # bytes, not characters
    "truncated": (b"valid text then a cut \xe2\x82", 22),  # a truncated sequence at the end
    "utf16": (b"\xff\xfeh\x00i\x00", 0),  # UTF-16 with its byte order mark
    "surrogate": (b"x\xed\xa0\x80y", 1),  # an encoded surrogate
    "far": (b"a" * 100_000 + b"\xc0\xaf", 100_000),  # an overlong encoding, far in
}


@pytest.mark.parametrize("content, offset", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_invalid_utf8_names_the_file_and_the_byte_offset(tmp_path, content, offset):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    _corpus_refused(corpus, f"{corpus}: not valid UTF-8 at byte offset {offset}")


def not_a_file(tmp: Path, kind: str) -> Path:
    """A corpus path of the given kind that is no readable file."""
    if kind == "missing":
        return tmp / "missing.txt"
    if kind == "missing-folder":
        return tmp / "no" / "such" / "corpus.txt"
    if kind == "directory":
        (tmp / "folder").mkdir()
        return tmp / "folder"
    if kind == "dangling-link":
        (tmp / "dangling.txt").symlink_to(tmp / "gone.txt")
        return tmp / "dangling.txt"
    assert kind == "link-to-directory"
    (tmp / "folder").mkdir()
    (tmp / "link").symlink_to(tmp / "folder")
    return tmp / "link"


@pytest.mark.parametrize("kind, words", [
    ("missing", "corpus file not found"),
    ("missing-folder", "corpus file not found"),
    ("directory", "corpus path is not a regular file"),
    ("dangling-link", "corpus file not found"),
    ("link-to-directory", "corpus path is not a regular file"),
])
def test_a_corpus_path_that_is_not_a_file_is_named(tmp_path, kind, words):
    data = not_a_file(tmp_path, kind)
    _corpus_refused(data, f"{data}: {words}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_corpus_is_named(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n", encoding="utf-8")
    corpus.chmod(0)
    try:
        _corpus_refused(corpus, f"{corpus}: cannot read corpus")
    finally:
        corpus.chmod(0o644)
