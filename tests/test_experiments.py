"""Experiments people write: a TOML that extends one of the reference's, trained and swept by
name without touching Python; `extends`, `--set` and `--grid` with their refusals; and exact
resume under every schedule and optimiser, dropout on."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import refused, snapshot, tiny_toml_file

from tinylm_jax.api.sweep import (
    ablation_settings,
    parse_ablation,
    parse_grid,
    prepare_sweep,
    settings,
)
from tinylm_jax.cli.run_experiment import main as train_main
from tinylm_jax.cli.sweep import main as sweep_main
from tinylm_jax.core.config import UserError, load_config, parse_override
from tinylm_jax.run.checkpoint import load_run

BUDGET = ["--max-epochs", "1", "--max-steps-per-epoch", "1", "--no-progress"]


def _record(run):
    return json.loads((run / "config.json").read_text())["experiment"]


def test_a_user_extends_the_baseline_trains_it_and_sweeps_it_by_name(tmp_path, tiny_corpus,
                                                                      monkeypatch, capsys):
    """The issue's user: experiments/mine.toml in their own folder, two lines, no Python."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "mine.toml").write_text(
        'extends = "baseline"\npositions = "rope"\n', encoding="utf-8")
    assert train_main(["mine", "--data", str(tiny_corpus), *BUDGET]) == 0
    record = _record(tmp_path / "runs" / "mine")
    baseline = load_config("baseline").to_dict()
    # Everything else is the baseline's, grad_scale included; --max-epochs set num_epochs.
    assert record == {**baseline, "name": "mine", "positions": "rope", "num_epochs": 1}
    assert sweep_main(["mine", "--data", str(tiny_corpus), "--grid", "lr=1e-3,3e-3",
                       "--seeds", "0", *BUDGET]) == 0
    sweep = tmp_path / "runs" / "sweep-mine"
    for lr in (0.001, 0.003):
        assert _record(sweep / f"lr={lr}" / "seed-0")["lr"] == lr
    table = (sweep / "sweep.md").read_text()
    assert table.count("| mine [lr=") + table.count("| **mine [lr=") == 2
    assert table.count("**") == 4  # one setting marked best, its name and its mean
    assert (sweep / "sweep.png").is_file()
    assert "wrote " in capsys.readouterr().out


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_extends_chains_through_paths_relative_to_each_file(tmp_path):
    _write(tmp_path / "a" / "base.toml", 'extends = "wider"\nlr = 2e-4\n')
    mine = _write(tmp_path / "b" / "mine.toml",
                  'extends = "../a/base.toml"\nqk_norm = true\nname = "Mine"\n')
    cfg = load_config(str(mine))
    assert cfg == load_config("wider").replace(lr=2e-4, qk_norm=True, name="Mine")
    assert load_config(str(tmp_path / "a" / "base.toml")).name == "base"


@pytest.mark.parametrize("files, words", [
    ({"x.toml": 'extends = "y.toml"\n', "y.toml": 'extends = "x.toml"\n'}, "goes round"),
    ({"x.toml": 'extends = "nowhere"\n'}, "unknown experiment 'nowhere'"),
    ({"x.toml": 'extends = "gone.toml"\n'}, "no such experiment file"),
    ({"x.toml": "extends = 3\n"}, "'extends' must be"),
    ({"x.toml": 'extends = "y.toml"\n', "y.toml": "lr_typo = 1\n"}, "unknown key(s) lr_typo"),
    ({"x.toml": 'extends = "baseline"\nuse_swiglu = true\n'}, "unknown key(s) use_swiglu"),
], ids=["circle", "unknown-name", "missing-file", "not-a-string", "bad-parent", "bad-child"])
def test_a_bad_extends_is_one_line_naming_the_file(tmp_path, files, words):
    for name, text in files.items():
        _write(tmp_path / name, text)
    with pytest.raises(UserError) as refusal:
        load_config(str(tmp_path / "x.toml"))
    message = str(refusal.value)
    assert words in message and "x.toml" in message and "\n" not in message


def test_every_experiment_file_is_an_experiment_by_name():
    assert load_config("baseline_no_positions").positions == "none"


@pytest.mark.parametrize("text, expected", [
    ("lr=1e-3", ("lr", 1e-3)), ("n_layers=4", ("n_layers", 4)),
    ("positions=rope", ("positions", "rope")), ("tie_embeddings=true", ("tie_embeddings", True)),
    ('name="my run"', ("name", "my run")), ("name=my run", ("name", "my run")),
])
def test_set_reads_values_as_toml_types(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("argv, words", [
    (["--set", "lr"], "not of the form key=value"),
    (["--set", "learning_rate=1e-3"], "unknown key(s) learning_rate"),
    (["--set", "lr=fast"], "'lr' must be a number"),
    (["--set", "qk_norm=1"], "'qk_norm' must be true or false"),
    (["--set", "positions=alibi"], "'positions' must be one of"),
    (["--set", "dropout=1.5"], "'dropout' must lie in [0, 1)"),
])
def test_a_bad_override_is_one_line_naming_the_key(tmp_path, tiny_toml, tiny_corpus, capsys,
                                                   argv, words):
    line = refused(train_main, [str(tiny_toml), "--data", str(tiny_corpus), "--out",
                                str(tmp_path / "run"), *argv], capsys, watch=tmp_path)
    assert words in line


def test_set_overrides_every_field_and_is_recorded(tmp_path, tiny_toml, tiny_corpus, capsys):
    assert train_main([str(tiny_toml), "--data", str(tiny_corpus), "--out", str(tmp_path / "r"),
                       "--set", "mlp=swiglu", "--set", "tie_embeddings=true", "--set",
                       "lr=0.01", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mlp = 'swiglu'" in out and "tie_embeddings = True" in out and "lr = 0.01" in out
    assert "\nproducts: " in out  # where the bf16 products run, and why


# --- the sweep -------------------------------------------------------------------------------


def test_the_grid_is_every_combination_named_as_its_overrides():
    points = settings(parse_grid(["lr=1e-3,3e-3", "qk_norm=false,true"]))
    assert [point.name for point in points] == [
        "lr=0.001,qk_norm=false", "lr=0.001,qk_norm=true",
        "lr=0.003,qk_norm=false", "lr=0.003,qk_norm=true"]
    assert points[1].overrides == {"lr": 1e-3, "qk_norm": True}
    assert [point.name for point in settings({})] == ["base"]


def test_an_ablation_is_one_setting_per_change_named_as_its_fields():
    points = ablation_settings(parse_ablation(["dropout=0", "schedule=plateau,warmup_steps=0"]))
    assert [point.name for point in points] == ["dropout=0", "schedule=plateau,warmup_steps=0"]
    assert points[1].overrides == {"schedule": "plateau", "warmup_steps": 0}


def test_an_ablation_s_members_are_the_experiment_with_one_change_each(tmp_path, tiny_toml,
                                                                       tiny_corpus, capsys):
    out = tmp_path / "ablation"
    assert sweep_main([str(tiny_toml), "--data", str(tiny_corpus), "--out", str(out), "--seeds",
                       "0-1", "--ablate", "dropout=0.1", "--ablate",
                       "schedule=cosine,warmup_steps=2", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("experiment: tiny [dropout=0.1]") == 2
    assert printed.count("experiment: tiny [schedule=cosine,warmup_steps=2]") == 2
    assert f"run folder: {out / 'schedule=cosine,warmup_steps=2' / 'seed-1'}" in printed
    assert "  dropout = 0.1\n" in printed and "  schedule = 'cosine'\n" in printed
    assert not out.exists()
    with pytest.raises(UserError, match="nosuch is not a field"):  # the API's keys, checked
        prepare_sweep(str(tiny_toml), out, seeds="0", ablation=[{"nosuch": 1}], dry_run=True,
                      data=str(tiny_corpus))


@pytest.mark.parametrize("argv, words", [
    (["--ablate", "dropout=0.1", "--ablate", "dropout=0.10"], "the same change as 'dropout=0.1'"),
    (["--ablate", "dropout=0,"], "'dropout=0,' has an empty part"),
    (["--ablate", "dropout=0,dropout=0.1"], "sets 'dropout' twice"),
    (["--ablate", "dropout"], "not of the form key=value"),
    (["--ablate", "seed=3"], "seed is set for the whole sweep"),
    (["--ablate", "dropout=0", "--grid", "lr=1e-3,2e-3"], "two designs"),
    (["--ablate", "mlp=oops"], "'mlp' must be one of"),
    (["--ablate", "dropout=0.1", "--ablate", "lr=0.03"], "'lr=0.03' changes nothing"),
    (["--grid", "lr=1e-3,oops"], "'lr' must be a number"),  # the second setting's, found first
    (["--grid", "lr=1e-3", "--grid", "lr=2e-3"], "'lr' is given twice"),
    (["--grid", "lr=1e-3,,2e-3"], "empty value"),
    (["--grid", "lr=1e-3,1e-3"], "gives a value twice"),
    (["--grid", "seed=1,2"], "seed is set for the whole sweep"),
    (["--grid", "name=a/b"], "cannot name a folder"),
    (["--grid", "lr_typo=1"], "unknown key(s) lr_typo"),
    (["--seeds", "3-1"], "the range 3-1 is empty"),
])
def test_every_member_is_checked_before_any_trains(tmp_path, tiny_toml, tiny_corpus, capsys,
                                                   argv, words):
    line = refused(sweep_main, [str(tiny_toml), "--data", str(tiny_corpus), "--out",
                                str(tmp_path / "sweep"), *argv], capsys, watch=tmp_path)
    assert words in line


def test_a_sweep_stopped_in_a_member_resumes_to_the_end(tmp_path, tiny_toml, tiny_corpus,
                                                        capsys):
    """Stopped by --stop-at-step inside its first member, resumed: the first member continues,
    the second starts, and the table reads both."""
    out = tmp_path / "sweep"
    argv = [str(tiny_toml), "--data", str(tiny_corpus), "--out", str(out), "--grid",
            "lr=0.01,0.02", "--max-epochs", "1", "--max-steps-per-epoch", "4", "--no-progress"]
    assert sweep_main([*argv, "--dry-run"]) == 0
    assert not out.exists() and capsys.readouterr().out.count("experiment: tiny [lr=") == 2
    assert train_main([str(tiny_toml), "--data", str(tiny_corpus), "--out",
                       str(out / "lr=0.01" / "seed-0"), "--set", "lr=0.01", "--set",
                       'name="tiny [lr=0.01]"', "--seed", "0", "--max-epochs", "1",
                       "--max-steps-per-epoch", "4", "--no-progress", "--stop-at-step",
                       "2"]) == 0
    before = snapshot(out)
    assert sweep_main([*argv, "--dry-run"]) == 0  # a dry run looks at no member's folder
    assert sweep_main(argv) == 2  # the folder exists: --resume, or refuse and change nothing
    assert "--resume" in capsys.readouterr().err and snapshot(out) == before
    assert sweep_main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("resumed") == 1 and "| 1 (0) |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["lr=0.01", "lr=0.02", "sweep.md",
                                                      "sweep.png"]


# --- exact resume under every recipe --------------------------------------------------------


@pytest.mark.parametrize("recipe", [
    dict(schedule="cosine", warmup_steps=3, optimizer="muon", dropout=0.1,
         attention_dropout=0.1, tie_embeddings=True, positions="rope", ema_decay=0.9),
    dict(schedule="wsd", warmup_steps=2, decay_fraction=0.5, lr_floor=0.1, mlp="swiglu"),
], ids=["cosine-muon-dropout-ema", "wsd"])
def test_a_run_stopped_mid_epoch_resumes_exactly_under_every_recipe(tmp_path, tiny_corpus,
                                                                    recipe):
    """Stopped at step 5 of epoch 2 and resumed from its checkpoint: the same history and the
    same parameters, bit for bit, as a run straight through; the schedule's position, the
    optimiser's state and the dropout stream all came back."""
    toml = tiny_toml_file(tmp_path / "recipe.toml", num_epochs=2, lr=0.01, **recipe)
    common = [str(toml), "--data", str(tiny_corpus), "--no-progress", "--max-steps-per-epoch",
              "4", "--steps-per-chunk", "2"]
    assert train_main([*common, "--out", str(tmp_path / "straight")]) == 0
    split = tmp_path / "split"
    assert train_main([*common, "--out", str(split), "--stop-at-step", "5"]) == 0
    assert train_main([*common, "--out", str(split), "--resume"]) == 0
    for name in ("history.csv",):
        straight_rows = (tmp_path / "straight" / name).read_text().splitlines()
        split_rows = (split / name).read_text().splitlines()
        # epoch_seconds and the rate differ between sessions; the losses and lr must not.
        assert [row.split(",")[:5] for row in straight_rows] == \
            [row.split(",")[:5] for row in split_rows]
    one, two = load_run(tmp_path / "straight", "latest"), load_run(split, "latest")
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_run_begun_before_products_were_recorded_resumes_on_xla(tiny_run, tmp_path, capsys):
    """config.json without `products` is a run of XLA's products: `auto` resumes it on them."""
    run, corpus = tiny_run
    copy = shutil.copytree(run, tmp_path / "run")
    record = json.loads((copy / "config.json").read_text())
    del record["products"]
    (copy / "config.json").write_text(json.dumps(record))
    assert train_main([str(run.parent / "tiny.toml"), "--data", str(corpus), "--out", str(copy),
                       "--max-epochs", "3", "--resume", "--no-progress"]) == 0
    assert "matrix products: xla" in capsys.readouterr().out
