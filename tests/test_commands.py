"""analyze.py, generate.py and plot_attention.py on a tiny finished run: files and bad input."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, refused, snapshot

from tinylm_jax.analysis import plots, reports
from tinylm_jax.analysis.attention import JS_DISTANCE_MAX
from tinylm_jax.analysis.corpus import open_corpus
from tinylm_jax.cli.analyze import analyze_main, generate_main, plot_attention_main
from tinylm_jax.cli.run_experiment import main as run_experiment_main
from tinylm_jax.core.model import model_flops_per_step
from tinylm_jax.reference.table1 import REFERENCE_VAL_PPL
from tinylm_jax.run.folder import RunFolder

PER_RUN_FILES = ["tokenizer_report.md", "token_frequencies.png", "loss_curves.png", "val_ppl.png",
                 "attention.npz", "attention/grid.png", "attention/layer1_head3.png",
                 "attention_stats.md", "attention_stats.csv", "head_similarity.md",
                 "head_similarity.csv", "head_similarity.png", "samples.md",
                 "attention_by_epoch.png"]


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    run, corpus = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, corpus


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_analyze_all_writes_every_artifact(run_copy, capsys):
    run, corpus = run_copy
    assert analyze_main(["all", str(run), "--data", str(corpus), "--windows", "40"]) == 0
    written = capsys.readouterr().out
    for name in PER_RUN_FILES:
        assert (run / name).is_file(), name
        assert f"wrote {run / name}" in written
    assert all(_is_png(p) for p in run.rglob("*.png"))
    report = (run / "tokenizer_report.md").read_text()
    assert "8,000 characters" in report and "| 1 | `,` |" in report
    with (run / "attention_stats.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 + 2 + 1 and rows[-1]["layer"] == "uniform"
    assert "Averaged over 40 validation windows" in (run / "attention_stats.md").read_text()
    samples = (run / "samples.md").read_text()
    for heading in ("## Top-5 next tokens", "## Predicted vs actual", "## Sample: 100 tokens"):
        assert heading in samples
    # Not the reference's corpus (a slice of it): prompts from its own validation text
    assert "Prompt: 'The one side'" in samples and "tokens after 'The one side'" in samples


def test_the_attention_export_is_causal_and_normalised(run_copy, capsys):
    run, corpus = run_copy
    assert analyze_main(["attention", str(run), "--data", str(corpus), "--window", "3"]) == 0
    with np.load(run / "attention.npz", allow_pickle=False) as f:
        attention, ids, tokens = f["attention"], f["token_ids"], f["tokens"]
        metadata = json.loads(str(f["metadata"]))
    assert attention.shape == (2, 4, 16, 16) and attention.dtype == np.float32
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(attention, k=1) == 0.0)
    corpus_view = open_corpus(run, str(corpus))
    start = corpus_view.window_start(3)
    assert ids.tolist() == corpus_view.ids[start:start + 16].tolist()
    assert tokens.tolist() == [corpus_view.tokenizer.id_to_token(int(i)) for i in ids]
    assert metadata["epoch"] == 1 and metadata["checkpoint"] == "best"  # tiny is best at epoch 1
    assert metadata["source"].startswith("validation window 3")
    assert len(list((run / "attention").glob("layer*_head*.png"))) == 8


def test_attention_of_your_own_text_and_replotting_it(run_copy, tmp_path, capsys):
    run, corpus = run_copy
    export = tmp_path / "mine.npz"
    argv = ["attention", str(run), "--data", str(corpus), "--text", "First Citizen:",
            "--out", str(export), "--which", "latest"]
    assert analyze_main(argv) == 0
    with np.load(export, allow_pickle=False) as f:
        assert "".join(f["tokens"].tolist()) == "FirstCitizen:"
        assert json.loads(str(f["metadata"]))["epoch"] == 2
    assert (tmp_path / "mine" / "grid.png").is_file()
    assert plot_attention_main([str(export), "--out", str(tmp_path / "maps")]) == 0
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2 * 4 + 1


def test_curves_and_a_comparison_need_no_corpus(run_copy, tmp_path, capsys):
    run, _ = run_copy
    assert analyze_main(["curves", str(run)]) == 0
    assert _is_png(run / "loss_curves.png") and _is_png(run / "val_ppl.png")
    other = tmp_path / "baseline"
    shutil.copytree(run, other)
    assert analyze_main(["compare", str(run), str(other), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert table.count("| tiny |") == 2 and "| 60.00 | 6 |" in table  # the reference's, by name
    assert "## tiny (baseline), epoch by epoch" in table and "| 6 |  | **60.00** |  |" in table
    assert _is_png(tmp_path / "cmp" / "val_ppl_comparison.png")


def test_the_attention_by_epoch_plot_needs_only_the_run_folder_and_its_record(run_copy, capsys):
    run, _ = run_copy
    assert analyze_main(["attention-epochs", str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'attention_by_epoch.png'}\n"
    assert _is_png(run / "attention_by_epoch.png")
    (run / "attention_by_epoch.png").unlink()
    (run / "attention_by_epoch.csv").unlink()  # a run trained without the record
    before = snapshot(run)
    err = refused(analyze_main, ["attention-epochs", str(run)], capsys)
    assert err == f"error: {run}: no attention_by_epoch.csv (the run did not record " \
                  "attention_by_epoch)\n"
    assert snapshot(run) == before


def test_a_comparison_draws_every_run_even_of_one_experiment(run_copy, tmp_path, monkeypatch,
                                                              capsys):
    run, _ = run_copy
    shutil.copytree(run, tmp_path / "seed1")
    drawn = {}
    monkeypatch.setattr(plots, "perplexity_comparison",
                        lambda histories, path, references: drawn.update(histories) or path)
    assert analyze_main(["compare", str(run), str(tmp_path / "seed1")]) == 0
    assert sorted(drawn) == ["tiny (run)", "tiny (seed1)"]


def test_a_comparison_draws_the_reference_curve_beside_each_run_of_its_experiments(
        run_copy, tmp_path, monkeypatch, capsys):
    run, _ = run_copy
    for name in ("baseline", "wider", "wider_reference1"):
        shutil.copytree(run, tmp_path / name)
    drawn = {}
    monkeypatch.setattr(plots, "perplexity_comparison",
                        lambda histories, path, references: drawn.update(references) or path)
    runs = [str(tmp_path / name) for name in ("run", "baseline", "wider", "wider_reference1")]
    assert analyze_main(["compare", *runs]) == 0
    # Matched by folder name here (the tiny runs' experiment is no reference's); each curve once.
    assert drawn == {"tiny (baseline)": REFERENCE_VAL_PPL["baseline"],
                     "tiny (wider)": REFERENCE_VAL_PPL["wider"]}


def test_the_budget_puts_runs_and_the_reference_curve_on_time_tokens_and_flops(run_copy, tmp_path,
                                                                           monkeypatch, capsys):
    run, _ = run_copy
    shutil.copytree(run, tmp_path / "baseline")
    out = tmp_path / "budget"
    assert analyze_main(["budget", str(run), str(tmp_path / "baseline"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out / 'budget.md'}\nwrote {out / 'budget.png'}\n"
    assert _is_png(out / "budget.png")
    table = (out / "budget.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    tokens = 2 * summary["train_windows"] * 16  # the tiny run: 2 epochs of 16-token windows
    assert f"PPL at {tokens:,} tokens" in table and "| reference report: baseline |" in table
    assert table.count("| tiny (") == 2 and "cpu, bfloat16" in table  # auto
    drawn = {}
    monkeypatch.setattr(plots, "budget_curves",
                        lambda curves, refs, path: drawn.update(curves=curves, references=refs)
                        or path)
    assert analyze_main(["budget", str(run), "--out", str(out)]) == 0
    curve = drawn["curves"][0]
    with (run / "history.csv").open() as f:
        seconds = np.cumsum([float(row["epoch_seconds"]) for row in csv.DictReader(f)])
    np.testing.assert_allclose(curve.spent["seconds"], seconds)
    steps = -(-summary["train_windows"] // 32)
    flops = model_flops_per_step(RunFolder(run).read_config())
    np.testing.assert_allclose(curve.spent["flops"], [steps * flops, 2 * steps * flops])
    assert drawn["references"] == {}  # a run named "run" of a tiny experiment has none


def test_the_budget_of_a_run_with_shortened_epochs_counts_only_the_steps_taken(run_copy,
                                                                              tmp_path, capsys):
    run, _ = run_copy
    record = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "max_steps_per_epoch": 2}))
    assert analyze_main(["budget", str(run), "--out", str(tmp_path / "budget")]) == 0
    tokens = 2 * 2 * 32 * 16  # two epochs of two steps of 32 windows of 16 tokens
    assert f"PPL at {tokens:,} tokens" in (tmp_path / "budget" / "budget.md").read_text()


def test_head_similarity_is_a_symmetric_distance_matrix_per_layer(run_copy, capsys):
    run, corpus = run_copy
    assert analyze_main(["head-similarity", str(run), "--data", str(corpus),
                         "--windows", "40"]) == 0
    with (run / "head_similarity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 and list(rows[0]) == ["layer", "head", "0", "1", "2", "3",
                                                    "uniform"]
    for layer in ("0", "1"):
        matrix = np.array([[float(row[str(h)]) for h in range(4)]
                           for row in rows if row["layer"] == layer])
        np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
        assert np.all(np.diag(matrix) == 0.0)
        assert np.all((matrix >= 0) & (matrix <= JS_DISTANCE_MAX))
    assert all(0 < float(row["uniform"]) <= JS_DISTANCE_MAX for row in rows)
    report = (run / "head_similarity.md").read_text()
    assert "over 40 validation windows" in report and "## Layer 1" in report
    assert _is_png(run / "head_similarity.png")


def test_generate_is_reproducible_and_starts_with_the_prompt(tiny_run, capsys):
    run, corpus = tiny_run
    argv = [str(run), "--data", str(corpus), "--prompt", "First Citizen:", "--seed", "5",
            "--max-new-tokens", "20", "--top-k", "10"]
    assert generate_main(argv) == 0
    first = capsys.readouterr().out
    assert generate_main(argv) == 0
    assert capsys.readouterr().out == first and first.startswith("First Citizen:")


def test_topk_and_predict_print_tables(tiny_run, capsys):
    run, corpus = tiny_run
    argv = ["topk", str(run), "--data", str(corpus), "--prompt", "You", "--k", "4"]
    assert analyze_main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Prompt: 'You'" and len(lines) == 5
    assert all(line.startswith(f"  {rank}. ") for rank, line in enumerate(lines[1:], 1))
    assert analyze_main(["predict", str(run), "--data", str(corpus), "--window", "2"]) == 0
    out = capsys.readouterr().out
    assert "[actual]" in out and "[predicted]" in out


def test_the_runner_can_analyse_at_the_end(tiny_toml, tiny_corpus, tmp_path, monkeypatch,
                                           capsys):
    """`--analyze` runs `analyze all`'s analysis (whose files the first test checks) on the
    finished run, and prints what it wrote."""
    calls = []

    def analyze_run(run_dir, data):
        calls.append((run_dir, data, (run_dir / "summary.json").is_file()))
        return [run_dir / name for name in PER_RUN_FILES]

    monkeypatch.setattr(reports, "analyze_run", analyze_run)
    out = tmp_path / "run"
    argv = [str(tiny_toml), "--data", str(tiny_corpus), "--out", str(out), "--no-progress",
            "--max-epochs", "1", "--max-steps-per-epoch", "2", "--analyze"]
    assert run_experiment_main(argv) == 0
    assert calls == [(out, str(tiny_corpus), True)]  # once, after training had finished
    written = capsys.readouterr().out
    assert all(f"wrote {out / name}" in written for name in PER_RUN_FILES)


D = ["--data", "{corpus}"]


@pytest.mark.parametrize("command, argv, message", [
    (analyze_main, ["all", "{missing}", *D], "not a run folder"),
    (analyze_main, ["attention", "{run}", "--window", "9999", *D], "--window must lie in [0, "),
    (analyze_main, ["attention", "{run}", "--text", "x " * 40, *D], "the model reads at most 16"),
    (analyze_main, ["attention", "{run}", "--text", "café", *D], "never saw: é"),
    (analyze_main, ["attention-stats", "{run}", "--windows", "0", *D], "--windows must lie in"),
    (analyze_main, ["head-similarity", "{run}", "--windows", "0", *D], "--windows must lie in"),
    (analyze_main, ["budget", "{run}", "{run}"], "need distinct names"),
    (analyze_main, ["budget", "{root}"], "no summary.json"),
    (analyze_main, ["budget", "{run}", "--out", "{corpus}"], "is not a folder"),
    (analyze_main, ["topk", "{run}", "--k", "0", *D], "--k must lie in [1, 50]"),
    (analyze_main, ["predict", "{run}", "--temperature", "-1", *D], "--temperature must be"),
    (analyze_main, ["compare", "{run}", "{run}"], "need distinct names"),
    (analyze_main, ["curves", "{corpus}"], "not a run folder"),
    (analyze_main, ["tokenizer", "{run}", "--data", "{run}/config.json"], "not the corpus"),
    (analyze_main, ["nosuch", "{run}"], "invalid choice: 'nosuch'"),
    (generate_main, ["{run}", "--max-new-tokens", "0", *D], "--max-new-tokens must be"),
    (generate_main, ["{run}", "--top-k", "-2", *D], "--top-k must lie in [0, 120]"),
    (generate_main, ["{run}", "--prompt", "", *D], "holds no tokens"),
    (generate_main, ["{run}", "--seed", "-1", *D], "--seed must lie in"),
    (generate_main, ["{run}", "--top-k", str(2**40), *D], "--top-k must lie in [0, 120]"),
    (analyze_main, ["attention", "{run}", "--out", "{root}/export", *D], "must be a .npz file"),
    (analyze_main, ["attention", "{run}", "--out", "{corpus}.npz", *D], "is not a folder"),
    (analyze_main, ["compare", "{run}", "--out", "{corpus}"], "is not a folder"),
    (plot_attention_main, ["{corpus}"], "must be a .npz file"),
    (plot_attention_main, ["{root}/x.npz", "--out", "{corpus}"], "is not a folder"),
    (plot_attention_main, ["{root}/x.npz"], "cannot read attention export"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys, command, argv,
                                                   message):
    run, corpus = tiny_run
    root = run.parent  # the run, its corpus and anything written beside them
    before = snapshot(root)
    values = {"run": run, "corpus": corpus, "root": root, "missing": tmp_path / "none"}
    assert message in refused(command, [arg.format(**values) for arg in argv], capsys)
    assert snapshot(root) == before


def test_the_scripts_have_help_and_no_tracebacks(tmp_path):
    for script in ("analyze.py", "generate.py", "plot_attention.py"):
        help_run = subprocess.run([sys.executable, f"scripts/{script}", "--help"], cwd=REPO,
                                  capture_output=True, text=True)
        assert help_run.returncode == 0 and "usage:" in help_run.stdout
    bad = subprocess.run([sys.executable, "scripts/plot_attention.py", str(tmp_path / "x.npz")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
