"""Every run folder committed under results/ still loads and analyses with today's code: its
config, history, summary and attention record are read, and the analyses that need no
checkpoint (the folders keep none) draw from them."""

import shutil

import pytest
from conftest import REPO

from tinylm_jax.analysis import reports
from tinylm_jax.analysis.attention_stats import AttentionRecord, read_attention_record
from tinylm_jax.run.folder import RunFolder

RUN_FOLDERS = sorted(path.parent for path in (REPO / "results").glob("*/config.json"))


def test_the_committed_run_folders_are_found():
    assert {path.name for path in RUN_FOLDERS} >= {"baseline", "medium_bf16", "wider_bf16"}


@pytest.mark.parametrize("published", RUN_FOLDERS, ids=lambda path: path.name)
def test_a_committed_run_folder_loads_and_analyses(published, tmp_path):
    run = shutil.copytree(published, tmp_path / published.name)  # the analyses write beside it
    folder = RunFolder(run)
    cfg, history, summary = folder.read_config(), folder.read_history(), folder.read_summary()
    assert summary["experiment"] == cfg.name and summary["epochs_run"] == len(history)
    paths = reports.write_curves(run)
    if (run / f"{AttentionRecord.name}.csv").is_file():
        assert read_attention_record(folder)[0]["epoch"] == 0
        paths += reports.write_attention_epochs(run)
    assert paths and all(path.stat().st_size > 0 for path in paths)


def test_the_committed_run_folders_compare(tmp_path):
    paths = reports.write_comparison(RUN_FOLDERS, tmp_path)
    table = paths[0].read_text(encoding="utf-8")
    assert all(RunFolder(path).read_summary()["experiment"] in table for path in RUN_FOLDERS)
