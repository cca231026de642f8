import pytest

from tinylm_jax.core.config import (
    EXPERIMENT_NAMES,
    UserError,
    config_from_dict,
    load_config,
    parse_seeds,
)


def test_the_three_experiments_are_the_references():
    baseline, medium, wider = (load_config(name) for name in EXPERIMENT_NAMES)
    assert (baseline.seq_len, baseline.d_model, baseline.n_heads, baseline.lr) == (64, 128, 4, 3e-4)
    assert medium.replace(seq_len=64, name=baseline.name) == baseline
    assert (wider.d_model, wider.n_heads, wider.d_ff, wider.lr) == (256, 8, 512, 1e-4)
    for cfg in (baseline, medium, wider):
        assert (cfg.batch_size, cfg.num_epochs, cfg.early_stop_patience) == (512, 20, 1)
        assert (cfg.weight_decay, cfg.grad_clip_norm, cfg.vocab_size) == (0.01, 1.0, 500)


def test_a_toml_path_loads(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nseq_len = 32\nlr = 1\n')
    cfg = load_config(str(path))
    assert (cfg.name, cfg.seq_len, cfg.lr) == ("mine", 32, 1.0)


@pytest.mark.parametrize("values, message", [
    ({"d_modle": 128}, "unknown key.*d_modle"),
    ({"d_model": 100, "n_heads": 3}, "divisible by n_heads"),
    ({"lr": 0}, "'lr' must be positive"),
    ({"lr": -1e-3}, "'lr' must be positive"),
    ({"lr": float("nan")}, "'lr' must be finite"),
    ({"batch_size": 0}, "'batch_size' must be positive"),
    ({"seq_len": -4}, "'seq_len' must be positive"),
    ({"seq_len": 6.5}, "'seq_len' must be an integer"),
    ({"n_heads": "4"}, "'n_heads' must be a number"),
    ({"n_layers": True}, "'n_layers' must be a number"),
    ({"train_fraction": 1.0}, "'train_fraction' must lie in"),
    ({"plateau_threshold": 1.5}, "'plateau_threshold' must lie in"),
    ({"name": ""}, "'name' must be a non-empty string"),
    ({"positional_encoding": "learned"},
     "'positional_encoding' must be one of sinusoidal, none, got 'learned'"),
    ({"d_model": 33, "n_heads": 1}, "must be even for the sinusoidal positions"),
])
def test_invalid_values_name_the_field(values, message):
    with pytest.raises(UserError, match=message):
        config_from_dict(values)


def test_unknown_experiment_lists_the_valid_ones():
    with pytest.raises(UserError, match="baseline, medium, wider"):
        load_config("widest")


def test_broken_toml_is_a_user_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("seq_len = = 3")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(str(path))


def test_only_the_sinusoidal_positions_need_an_even_width():
    cfg = config_from_dict({"d_model": 33, "n_heads": 1, "positional_encoding": "none"})
    assert (cfg.d_model, cfg.positional_encoding) == (33, "none")


def test_a_config_stored_before_positional_encoding_existed_loads_as_sinusoidal():
    stored = load_config("baseline").to_dict()
    del stored["positional_encoding"]
    assert config_from_dict(stored).positional_encoding == "sinusoidal"


def test_seed_lists_read_ranges_and_single_seeds_in_order():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("7, 1-2,9") == [7, 1, 2, 9]


@pytest.mark.parametrize("spec, message", [
    ("a-b", "not a list of seeds"), ("1-", "not a list of seeds"), ("-3", "not a list of seeds"),
    ("", "not a list of seeds"), ("3-1", "the range 3-1 is empty"),
    ("0-2,2", "seed 2 is given twice"),
    (f"{2**31}", "--seeds must lie in"),
])
def test_malformed_seed_lists_are_refused(spec, message):
    with pytest.raises(UserError, match=message):
        parse_seeds(spec)
