"""Shared fixtures: the real corpus (via $TINYLM_DATA), a tiny experiment on a slice of it, and
a finished run of that experiment."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tinylm_jax.cli.run_experiment import main
from tinylm_jax.core.config import ExperimentConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` and its bytes: equal snapshots mean nothing was written."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(command: Callable[[list[str]], int], argv: list[str],
            capsys: pytest.CaptureFixture) -> str:
    """Run a command line in-process on input it must refuse: exit code 2 and one `error:`
    line on stderr, which is returned."""
    try:
        code = command(argv)
    except SystemExit as usage_error:  # argparse's own checks exit from inside the parser
        code = usage_error.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    path = Path(os.environ.get("TINYLM_DATA") or DEFAULT_CORPUS)
    if not path.is_file():
        pytest.skip("real corpus not found: set TINYLM_DATA")
    return path


@pytest.fixture(scope="session")
def corpus_text(corpus_path: Path) -> str:
    return corpus_path.read_text(encoding="utf-8")


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    """Seconds per epoch on a CPU: a 2-block model with 32 dims on 16-token windows."""
    return ExperimentConfig(name="tiny", vocab_size=120, seq_len=16, d_model=32, n_layers=2,
                            n_heads=4, d_ff=64, lr=3e-3, batch_size=32, num_epochs=2)


@pytest.fixture
def tiny_corpus(tmp_path: Path, corpus_text: str) -> Path:
    """The first 8,000 characters of the corpus: about 3,000 tokens."""
    path = tmp_path / "tiny.txt"
    path.write_text(corpus_text[:8000], encoding="utf-8")
    return path


# On the first 8,000 characters this overfits from epoch 2 on: validation is best at epoch 1,
# and with plateau_patience 0 the learning rate halves after each of epochs 2 and 3.
TINY_TOML = """name = "tiny"
vocab_size = 120
seq_len = 16
d_model = 32
n_heads = 4
d_ff = 64
batch_size = 32
lr = 0.03
num_epochs = 4
plateau_patience = 0
early_stop_patience = 3
"""


@pytest.fixture
def tiny_toml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> tuple[Path, Path]:
    """(run folder, corpus) of the tiny experiment after two epochs. Tests that write into the
    run folder should work on a copy."""
    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text[:8000], encoding="utf-8")
    toml = root / "tiny.toml"
    toml.write_text(TINY_TOML.replace("num_epochs = 4", "num_epochs = 2"))
    run = root / "run"
    assert main([str(toml), "--data", str(corpus), "--out", str(run), "--no-progress"]) == 0
    return run, corpus
