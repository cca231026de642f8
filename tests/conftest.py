"""Shared fixtures: the real corpus (via $TINYLM_DATA) and a tiny experiment on a slice of it."""

import os
from pathlib import Path

import pytest

from tinylm_jax.config import ExperimentConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


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
