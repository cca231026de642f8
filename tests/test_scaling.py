"""attention_scaling.py: the power-law fit, a tiny end-to-end measurement, and bad flags."""

import csv

import numpy as np
import pytest
from conftest import refused, snapshot

from tinylm_jax.bench.scaling import fit_power_law
from tinylm_jax.cli.bench import scaling_main as main
from tinylm_jax.cli.bench import scaling_parser

TINY = ["--lengths", "8", "16", "--tokens", "64", "--windows", "4", "--repeats", "1"]


def test_the_fit_recovers_a_known_exponent_from_noisy_timings():
    lengths = np.array([32, 64, 128, 256, 512])
    noise = np.random.default_rng(0).normal(0.0, 0.02, len(lengths))
    exponent, coefficient = fit_power_law(lengths, 3 * lengths**2.0 * np.exp(noise))
    assert exponent == pytest.approx(2.0, abs=0.05)
    assert coefficient == pytest.approx(3.0, rel=0.2)
    assert fit_power_law([1, 2, 4], [5, 10, 20]) == pytest.approx((1.0, 5.0))


def test_a_tiny_measurement_writes_its_table_report_and_figure(tiny_toml, tmp_path, capsys):
    out = tmp_path / "scaling"
    assert main(["--experiment", str(tiny_toml), *TINY, "--out", str(out)]) == 0
    names = ["attention_scaling.md", "attention_scaling.csv", "attention_scaling.png"]
    assert capsys.readouterr().out.splitlines()[-3:] == [f"wrote {out / name}" for name in names]
    with (out / "attention_scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["setting"], row["seq_len"], row["batch"]) for row in rows] == [
        ("fixed tokens", "8", "8"), ("fixed tokens", "16", "4"),
        ("fixed windows", "8", "4"), ("fixed windows", "16", "4")]
    assert rows[1]["step_s"] == rows[3]["step_s"]  # one shape, measured once
    assert all(int(row["step_temp_bytes"]) < int(row["step_bytes"]) for row in rows)
    report = (out / "attention_scaling.md").read_text()
    assert "| fixed windows | attention sub-layer, seconds |" in report
    assert "--lengths 8 16" in report
    assert (out / "attention_scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        scaling_parser().parse_args(["--help"])
    usage = capsys.readouterr().out
    assert done.value.code == 0 and usage.startswith("usage: attention_scaling.py")
    assert all(flag in usage for flag in ("--lengths", "--tokens", "--windows", "--precision",
                                          "--repeats", "--out"))


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "must be positive"),
    (["--lengths", "0", "16"], "must be positive"),
    (["--lengths", "16"], "two or more distinct lengths"),
    (["--lengths", "16", "16"], "two or more distinct lengths"),
    (["--tokens", "100"], "--tokens (100) must be a multiple of every length, not of 8"),
    (["--precision", "fp16"], "invalid choice: 'fp16'"),
    (["--experiment", "nosuch"], "unknown experiment 'nosuch'"),
    (["--lengths", "8", "131072", "--tokens", "262144"], "'seq_len' must be at most 65536"),
    (["--out", "{file}"], "is not a folder"),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    taken = tmp_path / "taken"
    taken.write_text("a file where the folder would go")
    before = snapshot(tmp_path)
    argv = [*TINY, *[arg.format(file=taken) for arg in argv]]  # later flags win
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert message in refused(main, argv, capsys)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
