"""Experiments: the three of the reference, TOML files, and every value a config must refuse,
each with a message that names the field or the file (the command line prints it as is:
test_cli checks that contract once per kind of mistake)."""

import dataclasses
import datetime
import math
import typing

import pytest
from conftest import TINY, TomlLiteral, tiny_toml_text

from tinylm_jax.core.config import (
    EXPERIMENT_NAMES,
    FRACTION_FIELDS,
    MAX_SEED,
    POSITIVE_FIELDS,
    ExperimentConfig,
    UserError,
    config_from_dict,
    load_config,
    parse_seeds,
)

FIELD_TYPES = typing.get_type_hints(ExperimentConfig)
NUMERIC_FIELDS = [f.name for f in dataclasses.fields(ExperimentConfig)
                  if FIELD_TYPES[f.name] in (int, float)]
FRACTIONS = [name for name, _ in FRACTION_FIELDS]
ZERO_REFUSED = [*POSITIVE_FIELDS, *(name for name, lowest in FRACTION_FIELDS if lowest is None)]
ZERO_ALLOWED = [name for name in NUMERIC_FIELDS if name not in ZERO_REFUSED]
SOURCE = "bad.toml"  # what the checks name as the config's source


def _case_id(value: object) -> str:
    return str(value)


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


def test_the_three_experiments_are_the_references():
    baseline, medium, wider = (load_config(name) for name in EXPERIMENT_NAMES)
    assert (baseline.seq_len, baseline.d_model, baseline.n_heads, baseline.lr) == (64, 128, 4, 3e-4)
    assert medium.replace(seq_len=64, name=baseline.name) == baseline
    assert (wider.d_model, wider.n_heads, wider.d_ff, wider.lr) == (256, 8, 512, 1e-4)
    for cfg in (baseline, medium, wider):
        assert (cfg.batch_size, cfg.num_epochs, cfg.early_stop_patience) == (512, 20, 1)
        assert (cfg.weight_decay, cfg.grad_clip_norm, cfg.vocab_size) == (0.01, 1.0, 500)


def test_a_toml_path_loads_and_equals_its_dict(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(tiny_toml_text(), encoding="utf-8")
    cfg = load_config(str(path))
    assert (cfg.name, cfg.seq_len, cfg.lr) == ("tiny", 16, 0.03)
    assert cfg == config_from_dict(dict(TINY), source=SOURCE)


def test_a_field_left_out_takes_its_default():
    stored = load_config("baseline").to_dict()
    del stored["qk_norm"]  # e.g. config.json of a run from before the field
    assert config_from_dict(stored).qk_norm is False


def test_a_renamed_key_of_an_earlier_config_json_is_read_under_its_new_name():
    stored = {**load_config("baseline").to_dict(), "positional_encoding": "none"}
    del stored["positions"]
    assert config_from_dict(stored).positions == "none"


# --- numbers out of range ------------------------------------------------------------------


def test_the_range_tables_hold_what_they_must():
    """The tables the checks iterate over (config.py): the generated cases below refuse what
    they list, so they must list at least these."""
    assert {"vocab_size", "seq_len", "d_model", "lr", "batch_size"} <= set(POSITIVE_FIELDS)
    assert {"train_fraction", "plateau_factor", "adam_b2"} <= set(FRACTIONS)
    assert {"seed", "weight_decay", "adam_b1"} <= set(ZERO_ALLOWED)


def _numeric_cases() -> list[tuple[str, float, str]]:
    """(field, value, expected words) for every value each numeric field must refuse."""
    cases = []
    for name in NUMERIC_FIELDS:
        is_int = FIELD_TYPES[name] is int
        cases.append((name, -1, ""))
        if name in ZERO_REFUSED:
            cases.append((name, 0, ""))
        for value in (math.nan, math.inf, -math.inf):
            cases.append((name, value, "must be an integer" if is_int else "must be finite"))
    return cases


@pytest.mark.parametrize("field, value, words", _numeric_cases(), ids=_case_id)
def test_a_bad_numeric_value_names_its_field(field, value, words):
    assert words in _config_refused(f"'{field}'", **{field: value})


@pytest.mark.parametrize("field", ZERO_ALLOWED)
def test_zero_is_accepted_where_it_is_meaningful(field):
    assert getattr(config_from_dict({field: 0}), field) == 0


@pytest.mark.parametrize("field, value", [
    *((name, 1) for name in FRACTIONS),
    *((name, 1.5) for name in FRACTIONS),
    ("seed", MAX_SEED + 1),
    ("vocab_size", 2),
    # Huge sizes once crashed the tokenizer or XLA, or hung building 2**63 layers.
    *((name, 2**63) for name in ("vocab_size", "d_model", "n_layers", "d_ff")),
    ("vocab_size", 99999999999999999999999),
], ids=_case_id)
def test_a_value_above_its_range_names_its_field(field, value):
    _config_refused(f"'{field}'", **{field: value})


@pytest.mark.parametrize("d_model, n_heads", [(30, 4), (32, 3), (32, 64), (36, 8)])
def test_d_model_must_divide_among_the_heads(d_model, n_heads):
    assert d_model % n_heads
    _config_refused("d_model", "n_heads", "divisible", d_model=d_model, n_heads=n_heads)


def test_only_the_sinusoidal_positions_need_an_even_width():
    _config_refused("d_model (33) must be even", d_model=33, n_heads=3)
    cfg = config_from_dict({"d_model": 33, "n_heads": 1, "positions": "none"})
    assert (cfg.d_model, cfg.positions) == (33, "none")


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
    ("positions", "alibi", "must be one of sinusoidal, learned, rope, none, got 'alibi'"),
    ("norm", "batchnorm", "must be one of rmsnorm, layernorm"),
    ("mlp", "GELU", "must be one of gelu, swiglu, relu2"),
    ("schedule", "linear", "must be one of plateau, cosine, wsd"),
    ("optimizer", "sgd", "must be one of adamw, muon"),
    ("qk_norm", 1, "must be true or false"),
    ("tie_embeddings", "yes", "must be true or false"),
], ids=_case_id)
def test_a_value_of_the_wrong_type_names_its_field(field, value, words):
    assert words in _config_refused(f"'{field}'", **{field: value})


@pytest.mark.parametrize("field, value, words", [
    ("seq_len", '"64"', "must be a number"),
    ("d_ff", "{ width = 64 }", "must be a number"),
    ("lr", "1979-05-27", "must be a number"),
    ("vocab_size", "99999999999999999999999", "must be at most"),
], ids=_case_id)
def test_what_toml_makes_of_a_value_reaches_the_check(tmp_path, field, value, words):
    """A quoted number, an inline table, a date and a huge integer, as tomllib reads them."""
    toml = tmp_path / "bad.toml"
    toml.write_text(tiny_toml_text(**{field: TomlLiteral(value)}), encoding="utf-8")
    assert words in _load_refused(toml, f"'{field}'", str(toml))


@pytest.mark.parametrize("text", ["model.d_model = 32\n", "[model]\nd_model = 32\n"],
                         ids=["dotted-key", "table"])
def test_a_table_of_known_keys_is_an_unknown_key(tmp_path, text):
    toml = tmp_path / "bad.toml"
    toml.write_text(tiny_toml_text() + text, encoding="utf-8")
    _load_refused(toml, "unknown key(s) model", "valid keys: name, vocab_size", str(toml))


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


MISSING_FILES = {
    "missing": lambda tmp: tmp / "missing.toml",
    "missing-folder": lambda tmp: tmp / "no" / "such" / "folder.toml",
    "directory": lambda tmp: (tmp / "folder.toml").mkdir() or tmp / "folder.toml",
}


@pytest.mark.parametrize("make", MISSING_FILES.values(), ids=MISSING_FILES.keys())
def test_a_missing_experiment_file_is_named(tmp_path, make):
    toml = make(tmp_path)
    _load_refused(toml, "no such experiment file", str(toml))


@pytest.mark.parametrize("name", ["Baseline", "baseline ", "widest", "baseline.json", ""])
def test_an_unknown_experiment_is_named_with_the_known_ones(name):
    message = _load_refused(name, f"unknown experiment '{name}'")
    assert "baseline, medium, wider" in message


# --- random seeds ----------------------------------------------------------------------------


def test_seed_lists_read_ranges_and_single_seeds_in_order():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("7, 1-2,9") == [7, 1, 2, 9]


@pytest.mark.parametrize("spec, message", [
    ("a-b", "not a list of seeds"), ("1-", "not a list of seeds"), ("-3", "not a list of seeds"),
    ("", "not a list of seeds"), ("3-1", "the range 3-1 is empty"),
    ("0-2,2", "seed 2 is given twice"),
    (f"{2**31}", "--seeds must lie in"),
    (f"0-{2**31}", "--seeds must lie in"),  # refused before the range is expanded
    ("0-1000", "more than 1,000 runs"), ("²", "not a list of seeds"),
])
def test_malformed_seed_lists_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        parse_seeds(spec)
