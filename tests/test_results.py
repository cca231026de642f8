"""Every run folder committed under results/ still loads and analyses with today's code: its
config, history, summary (where it finished) and attention record are read, and the analyses
that need no checkpoint (the folders keep none) draw from them."""

import shutil

import pytest
from conftest import REPO

from tinylm_jax.analysis import reports
from tinylm_jax.analysis.attention_stats import AttentionRecord, read_attention_record
from tinylm_jax.analysis.evaluation import evaluate_run
from tinylm_jax.analysis.spread import read_sets
from tinylm_jax.run.folder import RunFolder

RESULTS = REPO / "results"
RUN_FOLDERS = sorted(path.parent for path in RESULTS.rglob("config.json"))
TABLE_1 = [RESULTS / name for name in ("baseline", "medium_bf16", "wider_bf16")]


def test_the_committed_run_folders_are_found():
    assert set(TABLE_1) <= set(RUN_FOLDERS)
    assert RESULTS / "spread" / "baseline" / "seed-0" in RUN_FOLDERS


@pytest.mark.parametrize("published", RUN_FOLDERS,
                         ids=lambda path: str(path.relative_to(RESULTS)))
def test_a_committed_run_folder_loads_and_analyses(published, tmp_path):
    run = shutil.copytree(published, tmp_path / "run")  # the analyses write beside it
    folder = RunFolder(run)
    cfg, history = folder.read_config(), folder.read_history()
    if folder.has_summary():  # else a run the search stopped before its end, kept as evidence
        summary = folder.read_summary()
        assert summary["experiment"] == cfg.name and summary["epochs_run"] == len(history)
    paths = reports.write_curves(run)
    if (run / f"{AttentionRecord.name}.csv").is_file():
        assert read_attention_record(folder)[0]["epoch"] == 0
        paths += reports.write_attention_epochs(run)
    assert paths and all(path.stat().st_size > 0 for path in paths)


def test_table_1_s_run_folders_compare(tmp_path):
    paths = reports.write_comparison(TABLE_1, tmp_path)
    table = paths[0].read_text(encoding="utf-8")
    assert all(RunFolder(path).read_summary()["experiment"] in table for path in TABLE_1)


def test_the_published_spread_is_what_the_committed_sets_of_seeds_give(tmp_path):
    """results/spread.md and the README's Table 1 column follow the seed-N folders: when a
    member is published, regenerate the report with the command it names, and update the
    README with its figures."""
    sets = sorted((RESULTS / "spread").iterdir())
    command = ("python scripts/analyze.py spread "
               f"{' '.join(str(path.relative_to(REPO)) for path in sets)} --out results")
    paths = reports.write_spread(sets, tmp_path, command)
    assert paths[0].read_text(encoding="utf-8") == \
        (RESULTS / "spread.md").read_text(encoding="utf-8")
    table_1 = {line.split()[1].lower(): line
               for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith(("| Baseline ", "| Medium ", "| Wider "))}
    for group in read_sets(sets):
        best = group.best
        assert f"| {best.mean_and_sd()} ({best.n}, " in table_1[group.reference]


# --- beyond the reference (experiments/beyond.toml) -----------------------------------------

BEYOND = RESULTS / "beyond"


def test_the_beyond_spread_is_what_its_seeds_give_in_ppl_and_nats(corpus_path, tmp_path):
    """results/beyond/spread.md follows its seed-N folders and the corpus's own characters:
    when a member is added, regenerate it with the command it names."""
    command = "python scripts/analyze.py spread results/beyond/spread --nats --out results/beyond"
    paths = reports.write_spread([BEYOND / "spread"], tmp_path, command, nats=True,
                                 data=str(corpus_path))
    assert paths[0].read_text(encoding="utf-8") == \
        (BEYOND / "spread.md").read_text(encoding="utf-8")
    (group,) = read_sets([BEYOND / "spread"])
    row = next(line for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| *Beyond the reference:* "))
    assert row.endswith(f"| {group.best.mean_and_sd()} ({group.best.n}, bf16) |")


def test_the_published_beyond_model_reproduces_its_seed_s_figure(corpus_path):
    """`tinylm evaluate` (its API, which the command prints) on the committed weights gives the
    validation perplexity that the spread report publishes for the seed they are, to 0.01, on
    whichever products this machine has."""
    model = BEYOND / "model"
    seed = RunFolder(model).read_config().seed
    published = RunFolder(BEYOND / "spread" / f"seed-{seed}").read_summary()["best_val_ppl"]
    assert abs(evaluate_run(model, str(corpus_path)).perplexity - published) < 0.01
