"""Bad input, exhaustively: each case is refused with a message that names the field or the file.

Through the command line, one case of each kind of error: it exits 2 with one `error:` line that
names the field or the file, prints no traceback and creates no folder. The many values of each
kind are checked in-process, at the function that refuses them (`config_from_dict` for the
experiment's fields, `load_config` for its file, `read_corpus` and `build_dataset` for the
corpus), where the command line gets its message from.

Every case fails before training (most before the corpus is even read), so the file runs in
seconds and needs no real corpus: the valid corpus below is synthetic.
"""

import dataclasses
import datetime
import math
import os
import typing
from pathlib import Path

import pytest
from conftest import TINY, TomlLiteral, tiny_config, tiny_toml_file, tiny_toml_text

from tinylm_jax.cli.run_experiment import main
from tinylm_jax.core.config import (
    MAX_SEED,
    ExperimentConfig,
    UserError,
    config_from_dict,
    load_config,
)
from tinylm_jax.core.data import build_dataset, read_corpus

FIELD_TYPES = typing.get_type_hints(ExperimentConfig)
NUMERIC_FIELDS = [f.name for f in dataclasses.fields(ExperimentConfig)
                  if FIELD_TYPES[f.name] in (int, float)]
# Fields for which 0 is a legitimate value (config.py): the seed, no weight decay, no first-moment
# decay, a cut after every bad epoch, a GradScaler scale that never grows. Every other numeric
# field must refuse 0. test_zero_is_accepted_where_it_is_meaningful keeps this set honest.
ZERO_ALLOWED = {"seed", "weight_decay", "adam_b1", "plateau_patience",
                "grad_scale_growth_interval"}
# Fields that must stay below 1 (config.py's _FRACTIONS).
FRACTION_FIELDS = {"train_fraction", "plateau_factor", "plateau_threshold", "adam_b1", "adam_b2",
                   "weight_decay"}
SEQ_LEN = TINY["seq_len"]
SOURCE = "bad.toml"  # what the in-process checks name as the config's source

WORDS = ("to be or not that is the question whether tis nobler in the mind to suffer "
         "the slings and arrows of outrageous fortune").split()


def _case_id(value: object) -> str:
    return str(value)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A valid corpus of about 2,700 tokens, on which the tiny experiment passes --dry-run."""
    path = tmp_path / "corpus.txt"
    lines = (" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(9)) for i in range(300))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(tmp_path: Path, **changes: object) -> Path:
    return tiny_toml_file(tmp_path / "bad.toml", **changes)


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], experiment: object,
             corpus: Path, *names: str) -> str:
    """Run the CLI and check the contract of bad input; return the error line."""
    out = tmp_path / "run"
    before = sorted(tmp_path.rglob("*"))
    code = main([str(experiment), "--data", str(corpus), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err
    assert code == 2, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert captured.out == ""
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"
    assert not out.exists()
    assert sorted(tmp_path.rglob("*")) == before  # no folder (nor file) created anywhere
    return err


def _config_refused(*names: str, **changes: object) -> str:
    """The tiny experiment with `changes`, refused by `config_from_dict`: a message naming the
    source and each of `names`, which is returned."""
    with pytest.raises(UserError) as refusal:
        config_from_dict({**TINY, **changes}, source=SOURCE)
    message = str(refusal.value)
    assert message.startswith(f"{SOURCE}: ") and "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def _load_refused(path: object, *names: str) -> str:
    """`load_config` refuses `path` with a message naming each of `names`; returned."""
    with pytest.raises(UserError) as refusal:
        load_config(str(path))
    message = str(refusal.value)
    assert "\n" not in message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def _corpus_refused(path: Path, *names: str, cfg: ExperimentConfig | None = None) -> str:
    """The corpus at `path` is refused (read, then split for `cfg`) with a message naming each
    of `names`; returned. The command line prefixes a splitting error with the path."""
    with pytest.raises(UserError) as refusal:
        build_dataset(read_corpus(path), cfg or tiny_config())
    message = str(refusal.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


# --- the baseline the cases edit is valid ---------------------------------------------------


def test_the_unedited_case_is_accepted(tmp_path, corpus, capsys):
    """Each case below differs from this accepted one in exactly the edit it names."""
    toml = _toml(tmp_path)
    out = tmp_path / "run"
    assert main([str(toml), "--data", str(corpus), "--out", str(out), "--dry-run"]) == 0
    assert "parameters: " in capsys.readouterr().out
    assert not out.exists()
    assert config_from_dict(dict(TINY), source=SOURCE) == load_config(str(toml))


def test_the_numeric_fields_are_found():
    """The generated cases below cover every int/float field; guard against an empty list."""
    assert {"vocab_size", "seq_len", "d_model", "lr", "train_fraction", "seed"} <= \
        set(NUMERIC_FIELDS)
    assert ZERO_ALLOWED <= set(NUMERIC_FIELDS)
    assert FRACTION_FIELDS <= {name for name in NUMERIC_FIELDS if FIELD_TYPES[name] is float}


# --- negative, zero, NaN (and infinite) values of every numeric field -----------------------


def _numeric_cases() -> list[tuple[str, float, str]]:
    """(field, value, expected words) for every value each numeric field must refuse."""
    cases = []
    for name in NUMERIC_FIELDS:
        is_int = FIELD_TYPES[name] is int
        cases.append((name, -1, ""))
        if name not in ZERO_ALLOWED:
            cases.append((name, 0, ""))
        for value in (math.nan, math.inf, -math.inf):
            cases.append((name, value, "must be an integer" if is_int else "must be finite"))
    return cases


@pytest.mark.parametrize("field, value, words", _numeric_cases(), ids=_case_id)
def test_a_bad_numeric_value_names_its_field(field, value, words):
    assert words in _config_refused(f"'{field}'", **{field: value})


def test_a_bad_numeric_value_in_an_experiment_file_is_one_line_naming_field_and_file(
        tmp_path, corpus, capsys):
    toml = _toml(tmp_path, lr=math.nan)
    err = _refused(tmp_path, capsys, toml, corpus, "'lr'", str(toml))
    assert "must be finite" in err


@pytest.mark.parametrize("field", sorted(ZERO_ALLOWED))
def test_zero_is_accepted_where_it_is_meaningful(field):
    assert getattr(config_from_dict({field: 0}), field) == 0


@pytest.mark.parametrize("field, value", [
    *((name, 1) for name in sorted(FRACTION_FIELDS)),
    *((name, 1.5) for name in sorted(FRACTION_FIELDS)),
    ("seed", MAX_SEED + 1),
    ("vocab_size", 2),
    # Huge sizes once crashed the tokenizer or XLA, or hung building 2**63 layers.
    *((name, 2**63) for name in ("vocab_size", "d_model", "n_layers", "d_ff")),
    ("vocab_size", 99999999999999999999999),
], ids=_case_id)
def test_a_value_above_its_range_names_its_field(field, value):
    _config_refused(f"'{field}'", **{field: value})


def test_a_value_above_its_range_in_an_experiment_file_is_one_line(tmp_path, corpus, capsys):
    toml = _toml(tmp_path, vocab_size=TomlLiteral("99999999999999999999999"))
    _refused(tmp_path, capsys, toml, corpus, "'vocab_size'", str(toml))


@pytest.mark.parametrize("d_model, n_heads", [(30, 4), (32, 3), (32, 64), (36, 8)])
def test_d_model_must_divide_among_the_heads(d_model, n_heads):
    assert d_model % n_heads
    _config_refused("d_model", "n_heads", "divisible", d_model=d_model, n_heads=n_heads)


def test_d_model_must_divide_among_the_heads_of_an_experiment_file(tmp_path, corpus, capsys):
    toml = _toml(tmp_path, d_model=30, n_heads=4)
    _refused(tmp_path, capsys, toml, corpus, "d_model", "n_heads", "divisible", str(toml))


def test_d_model_must_be_even():
    _config_refused("d_model (33) must be even", d_model=33, n_heads=3)


# --- wrong keys, wrong types, broken TOML ---------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("d_modle", 64),
    ("D_MODEL", 64),
    ("seq-len", 16),
    ("model", {"d_model": 32}),  # what TOML makes of `model.d_model = 32` and of `[model]`
    ("learning_rate", 0.01),
])
def test_an_unknown_key_is_named(key, value):
    message = _config_refused(f"unknown key(s) {key}", **{key: value})
    assert "valid keys: name, vocab_size" in message


@pytest.mark.parametrize("text", ["model.d_model = 32\n", "[model]\nd_model = 32\n"],
                         ids=["dotted-key", "table"])
def test_a_table_of_known_keys_in_an_experiment_file_is_an_unknown_key(tmp_path, corpus, capsys,
                                                                       text):
    toml = tmp_path / "bad.toml"
    toml.write_text(tiny_toml_text() + text, encoding="utf-8")
    err = _refused(tmp_path, capsys, toml, corpus, "unknown key(s) model", str(toml))
    assert "valid keys: name, vocab_size" in err


@pytest.mark.parametrize("field, value, words", [
    ("seq_len", "64", "must be a number"),
    ("lr", "3e-3", "must be a number"),
    ("n_layers", True, "must be a number"),
    ("batch_size", [32], "must be a number"),
    ("d_ff", {"width": 64}, "must be a number"),
    ("lr", datetime.date(1979, 5, 27), "must be a number"),
    ("seq_len", 16.5, "must be an integer"),
    ("seed", 0.5, "must be an integer"),
    ("name", 3, "must be a non-empty string"),
    ("name", "", "must be a non-empty string"),
], ids=_case_id)
def test_a_value_of_the_wrong_type_names_its_field(field, value, words):
    assert words in _config_refused(f"'{field}'", **{field: value})


@pytest.mark.parametrize("field, value, words", [
    ("seq_len", '"64"', "must be a number"),
    ("d_ff", "{ width = 64 }", "must be a number"),
    ("lr", "1979-05-27", "must be a number"),
], ids=_case_id)
def test_a_toml_value_of_the_wrong_type_is_one_line_naming_field_and_file(
        tmp_path, corpus, capsys, field, value, words):
    """What tomllib makes of a quoted number, an inline table and a date reaches the check."""
    toml = _toml(tmp_path, **{field: TomlLiteral(value)})
    assert words in _refused(tmp_path, capsys, toml, corpus, f"'{field}'", str(toml))


BROKEN_TOML = {
    "double-equals": b"seq_len = = 3\n",
    "duplicate-key": tiny_toml_text().encode() + b"d_model = 64\n",
    "unterminated-string": tiny_toml_text().encode() + b'name = "unterminated\n',
    "broken-table": tiny_toml_text().encode() + b"[model\n",
    "no-equals": b"seq_len 16\n",
    "not-utf8": tiny_toml_text(name=None).encode() + b'name = "caf\xe9"\n',
}


@pytest.mark.parametrize("content", BROKEN_TOML.values(), ids=BROKEN_TOML.keys())
def test_a_file_that_is_not_toml_is_named(tmp_path, content):
    toml = tmp_path / "bad.toml"
    toml.write_bytes(content)
    _load_refused(toml, "not valid TOML", str(toml))


def test_a_file_that_is_not_toml_is_one_line_naming_it(tmp_path, corpus, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_bytes(BROKEN_TOML["duplicate-key"])
    _refused(tmp_path, capsys, toml, corpus, "not valid TOML", str(toml))


MISSING_FILES = {
    "missing": lambda tmp: tmp / "missing.toml",
    "missing-folder": lambda tmp: tmp / "no" / "such" / "folder.toml",
    "directory": lambda tmp: (tmp / "folder.toml").mkdir() or tmp / "folder.toml",
}


@pytest.mark.parametrize("make", MISSING_FILES.values(), ids=MISSING_FILES.keys())
def test_a_missing_experiment_file_is_named(tmp_path, make):
    toml = make(tmp_path)
    _load_refused(toml, "no such experiment file", str(toml))


def test_a_missing_experiment_file_is_one_line_naming_it(tmp_path, corpus, capsys):
    toml = MISSING_FILES["missing-folder"](tmp_path)
    _refused(tmp_path, capsys, toml, corpus, "no such experiment file", str(toml))


@pytest.mark.parametrize("name", ["Baseline", "baseline ", "widest", "baseline.json", ""])
def test_an_unknown_experiment_is_named(name):
    message = _load_refused(name, f"unknown experiment '{name}'")
    assert "baseline, medium, wider" in message


def test_an_unknown_experiment_is_one_line_naming_the_known_ones(tmp_path, corpus, capsys):
    err = _refused(tmp_path, capsys, "widest", corpus, "unknown experiment 'widest'")
    assert "baseline, medium, wider" in err


# --- bad corpora ----------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\t\r\n  "],
                         ids=["empty", "newline", "whitespace"])
def test_an_empty_corpus_is_named(tmp_path, content):
    data = tmp_path / "empty.txt"
    data.write_bytes(content)
    _corpus_refused(data, f"{data}: corpus is empty")


def test_an_empty_corpus_is_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "empty.txt"
    data.write_bytes(b"  \n\t\r\n  ")
    _refused(tmp_path, capsys, _toml(tmp_path), data, f"{data}: corpus is empty")


@pytest.mark.parametrize("tokens", [1, SEQ_LEN - 1, SEQ_LEN, SEQ_LEN + 1])
def test_a_corpus_of_at_most_seq_len_plus_one_tokens_is_too_short(tmp_path, tokens):
    # One window needs seq_len + 1 tokens, and the split needs one window for each side.
    data = tmp_path / "short.txt"
    data.write_text(" ".join(["a"] * tokens) + "\n", encoding="utf-8")
    _corpus_refused(data, "corpus too short", f"{tokens} tokens", f"seq_len {SEQ_LEN}")


def test_a_corpus_too_short_is_one_line_naming_it(tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text(" ".join(["a"] * (SEQ_LEN + 1)) + "\n", encoding="utf-8")
    _refused(tmp_path, capsys, _toml(tmp_path), data, f"{data}: corpus too short",
             f"{SEQ_LEN + 1} tokens", f"seq_len {SEQ_LEN}")


def test_seq_len_plus_one_characters_are_too_short(tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("abcdefghijklmnopq"[:SEQ_LEN + 1], encoding="utf-8")
    _corpus_refused(data, "corpus too short", f"seq_len {SEQ_LEN}")


def test_seq_len_plus_two_tokens_are_enough(tmp_path, capsys):
    """The boundary of the cases above: two windows, one to train and one to validate."""
    data = tmp_path / "short.txt"
    data.write_text(" ".join(["a"] * (SEQ_LEN + 2)) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main([str(_toml(tmp_path)), "--data", str(data), "--out", str(out), "--dry-run"]) == 0
    assert "1 train / 1 validation" in capsys.readouterr().out


def test_a_vocab_too_small_for_the_corpus_is_named(tmp_path, corpus, capsys):
    toml = _toml(tmp_path, vocab_size=3)
    _refused(tmp_path, capsys, toml, corpus, f"{corpus}: vocab_size 3 is too small")


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
def test_invalid_utf8_names_the_file_and_the_byte_offset(corpus, content, offset):
    corpus.write_bytes(content)
    _corpus_refused(corpus, f"{corpus}: not valid UTF-8 at byte offset {offset}")


def test_invalid_utf8_is_one_line_naming_the_file_and_the_byte_offset(tmp_path, corpus, capsys):
    corpus.write_bytes(INVALID_UTF8["after-multibyte"][0])
    _refused(tmp_path, capsys, _toml(tmp_path), corpus,
             f"{corpus}: not valid UTF-8 at byte offset 10")


def _not_a_file(tmp: Path, kind: str) -> Path:
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
    data = _not_a_file(tmp_path, kind)
    _corpus_refused(data, f"{data}: {words}")


@pytest.mark.parametrize("kind, words", [
    ("missing-folder", "corpus file not found"),
    ("directory", "corpus path is not a regular file"),
])
def test_a_corpus_path_that_is_not_a_file_is_one_line_naming_it(tmp_path, capsys, kind, words):
    data = _not_a_file(tmp_path, kind)
    _refused(tmp_path, capsys, _toml(tmp_path), data, f"{data}: {words}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_corpus_is_named(tmp_path, corpus, capsys):
    corpus.chmod(0)
    try:
        _refused(tmp_path, capsys, _toml(tmp_path), corpus, f"{corpus}: cannot read corpus")
    finally:
        corpus.chmod(0o644)


def test_the_config_is_checked_before_the_corpus(tmp_path, capsys):
    """With both broken, the config is named: nothing about the data is read for a bad config."""
    data = tmp_path / "missing.txt"
    toml = _toml(tmp_path, lr=math.nan)
    err = _refused(tmp_path, capsys, toml, data, "'lr'")
    assert str(data) not in err
