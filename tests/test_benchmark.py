"""The benchmark runs both paths on a tiny experiment and reports what it measured."""

import pytest

from tinylm_jax.benchmark import main, model_flops_per_step, run_benchmark
from tinylm_jax.config import load_config


def test_model_flops_follow_the_palm_accounting():
    cfg = load_config("baseline")
    per_token = 6 * (391_552 - 500 * 128) + 12 * 2 * 64 * 128
    assert model_flops_per_step(cfg) == per_token * 512 * 64


def test_the_benchmark_measures_ours_beside_the_seeds_loop(tiny_toml, tiny_corpus):
    pytest.importorskip("torch")
    report = run_benchmark([str(tiny_toml)], tiny_corpus, steps=2, repeats=2, precision="fp32",
                           devices=None, with_torch=True, log=lambda *_: None)
    rows = [line for line in report.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[1] for row in rows] == ["tinylm-jax", "PyTorch, seed's loop",
                                                     "**speed, ours / theirs**"]
    assert all(float(row.split(" | ")[4].replace(",", "")) > 0 for row in rows[:2])  # tok/s
    assert "Host memory, peak RSS" in report and "MiB" in report


def test_bad_flags_are_one_line(capsys):
    assert main(["baseline", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: --steps and --repeats must be positive\n"
    assert main(["nosuch"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown experiment 'nosuch'")
