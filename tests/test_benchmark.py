"""The benchmark runs both paths on a tiny experiment and reports what it measured."""

import re

import pytest

from tinylm_jax.bench.benchmark import model_flops_per_step, run_benchmark
from tinylm_jax.bench.gemm_rates import gemm_rates_markdown
from tinylm_jax.cli.bench import benchmark_main as main
from tinylm_jax.core import versions
from tinylm_jax.core.config import load_config
from tinylm_jax.core.data import build_dataset, num_batches
from tinylm_jax.run.products import dense_shapes


def test_model_flops_follow_the_palm_accounting():
    # 327,552 matmul parameters (391,552 less the 500 x 128 embedding table): 6 FLOPs each per
    # token, plus 12 * 2 layers * 64 * 128 for attention, times 512 x 64 tokens.
    assert model_flops_per_step(load_config("baseline")) == 2_161_920 * 32_768


def test_the_benchmark_measures_ours_beside_the_reference_loop(tiny_toml, tmp_path, corpus_text):
    pytest.importorskip("torch")
    corpus = tmp_path / "short.txt"
    corpus.write_text(corpus_text[:2000], encoding="utf-8")
    data = build_dataset(corpus_text[:2000], load_config(str(tiny_toml)))
    steps = 40  # more than either split has batches (24 and 6): both paths wrap round
    assert steps > num_batches(data.splits.num_train, 32) > num_batches(data.splits.num_val, 32)
    report = run_benchmark([str(tiny_toml)], corpus, steps=steps, repeats=1, precision="fp32",
                           devices=None, with_torch=True, log=lambda *_: None)
    rows = [line for line in report.splitlines() if line.startswith("| tiny |")]
    reference = "PyTorch, reference's loop"
    autocast = f"{reference}, CPU bf16 autocast"
    assert [row.split(" | ")[1] for row in rows] == ["tinylm-jax", reference, autocast,
                                                     f"**ours / {reference}**",
                                                     f"**ours / {autocast}**"]
    assert all(float(row.split(" | ")[4].replace(",", "")) > 0 for row in rows[:3])  # tok/s
    memory = re.search(r"dry run ([\d,]+) MiB; reference data path \(torch\) ([\d,]+) MiB", report)
    assert memory and all(int(m.replace(",", "")) > 50 for m in memory.groups())


def test_bad_flags_are_one_line(capsys):
    assert main(["baseline", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "error: --steps must be positive, got 0\n"
    assert main(["baseline", "--repeats", "0"]) == 2
    assert capsys.readouterr().err == "error: --repeats must be positive, got 0\n"
    assert main(["nosuch"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown experiment 'nosuch'")


def test_the_gemm_rates_table_has_every_shape_in_every_form(tiny_cfg):
    """Each distinct dense shape of the model, forward and both gradients, with a rate for XLA
    (and for MKL where the cpu extra is installed), measured on tiny products."""
    cfg = tiny_cfg.replace(mlp="swiglu")  # ff_in twice as wide: a shape of its own
    table = gemm_rates_markdown([cfg], rows=64, repeats=1)
    rows = [line for line in table.splitlines() if line.startswith("| 64 x")]
    assert len(rows) == 3 * len(dense_shapes(cfg)) == 12
    assert "| 64 x 32 -> 128 | ff_in |" in table  # 2 x d_ff
    for row in rows:
        rates = [cell.strip() for cell in row.split("|")[4:-1]]
        assert all(float(rate.rstrip("x").replace(",", "")) > 0 for rate in rates), row


def test_figures_name_the_chip_from_cpuinfo_else_the_platform(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: A Test CPU\nflags\t\t: fpu avx2\n")
    monkeypatch.setattr(versions, "CPUINFO", cpuinfo)
    assert versions.cpu_name().startswith("A Test CPU (") and versions.cpu_name().endswith(
        " cores)")
    assert versions.cpuinfo_field("flags") == "fpu avx2"
    monkeypatch.setattr(versions, "CPUINFO", tmp_path / "absent")
    assert versions.cpuinfo_field("model name") is None and versions.cpu_name()
