"""A run's validation figures, recomputed from its weights: perplexity, nats per token and nats
per character, the last independent of the tokenizer (so that a BPE model stands beside
character-level ones).

Every validation window is scored, as training scores them (token-weighted, in the run's own
precision and products unless asked otherwise). A target token's characters are the text from
the end of the token before it to its own end, so the whitespace the pre-tokenizer drops counts
once, with the token after it; a window's characters are those of its targets, taken from the
validation windows' own text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from tinylm_jax.analysis.corpus import RunCorpus, open_corpus
from tinylm_jax.core.data import batch_rows
from tinylm_jax.core.parallel import data_mesh, replicate, shard_batch_rows
from tinylm_jax.core.train import (
    create_train_state,
    default_steps_per_chunk,
    eval_chunk,
    products_for,
)
from tinylm_jax.run.checkpoint import load_run
from tinylm_jax.run.folder import RunFolder


@dataclass(frozen=True)
class Evaluation:
    loss_sum: float  # nats over every validation target token
    tokens: int  # validation target tokens, windows overlapping
    chars: int  # their characters

    @property
    def nats_per_token(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def nats_per_char(self) -> float:
        return self.loss_sum / self.chars


def target_chars(corpus: RunCorpus, starts: np.ndarray) -> int:
    """The characters of the targets of the windows at `starts`: positions start+1 ... start+L,
    each from the end of the token before it to its own end."""
    ends = corpus.offsets[:, 1]
    return int(np.sum(ends[starts + corpus.config.seq_len] - ends[starts]))


def evaluate_run(run_dir: Path, data: str | None = None, which: str = "best",
                 precision: str | None = None) -> Evaluation:
    """Score every validation window of the run's corpus with its `which` checkpoint, in
    `precision` (default: the run's own) on the products the run trained with."""
    folder = RunFolder(run_dir)
    precision = precision or folder.recorded("precision")
    products = products_for(precision, folder.recorded("products"))[0]
    corpus = open_corpus(run_dir, data)
    run = load_run(run_dir, which, precision)
    cfg = run.config
    mesh = data_mesh()
    state = create_train_state(cfg, precision, products=products).with_eval_params(run.params)
    state, tokens = replicate(state, mesh), replicate(jax.numpy.asarray(corpus.ids), mesh)
    starts = corpus.splits.validation_starts()
    rows = batch_rows(starts, cfg.batch_size)
    size = default_steps_per_chunk()
    loss_sum = 0.0
    token_count = 0.0
    for first in range(0, len(rows["starts"]), size):
        chunk = shard_batch_rows({k: v[first:first + size] for k, v in rows.items()}, mesh)
        metrics = jax.device_get(eval_chunk(state, tokens, chunk["starts"], chunk["weights"],
                                            seq_len=cfg.seq_len))
        loss_sum += float(np.sum(np.asarray(metrics["loss_sum"], np.float64)))
        token_count += float(np.sum(np.asarray(metrics["tokens"], np.float64)))
    return Evaluation(loss_sum, int(token_count), target_chars(corpus, starts))


def evaluation_markdown(run_dir: Path, which: str, evaluation: Evaluation) -> str:
    return "\n".join([
        f"{run_dir} ({which} checkpoint), every validation window:",
        f"  validation perplexity   {evaluation.perplexity:.2f}",
        f"  nats per token          {evaluation.nats_per_token:.4f}",
        f"  nats per character      {evaluation.nats_per_char:.4f}",
        f"  target tokens           {evaluation.tokens:,}",
        f"  their characters        {evaluation.chars:,} "
        f"({evaluation.chars / evaluation.tokens:.3f} per token)", ""])
