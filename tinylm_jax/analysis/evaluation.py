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
from tinylm_jax.core.config import UserError
from tinylm_jax.core.data import Dataset
from tinylm_jax.core.parallel import check_batch_fits, data_mesh, replicate
from tinylm_jax.core.protocol import Clock, validation_sample
from tinylm_jax.core.train import create_train_state
from tinylm_jax.run.checkpoint import load_run
from tinylm_jax.run.folder import RunFolder
from tinylm_jax.run.loop import Loop, evaluate
from tinylm_jax.run.products import products_for


@dataclass(frozen=True)
class Evaluation:
    loss_sum: float  # nats over every validation target token
    tokens: int  # validation target tokens, windows overlapping (every window's every target)
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
    first, stop = int(starts.min()), int(starts.max()) + corpus.config.seq_len + 1
    ends = corpus.offsets(first, stop)[:, 1]  # only the windows' own tokens
    return int(np.sum(ends[starts - first + corpus.config.seq_len] - ends[starts - first]))


def validation_characters(corpus: RunCorpus, windows: int = 0) -> tuple[int, int]:
    """(target tokens, their characters) over the validation windows an evaluation of
    `windows` reads (`eval_windows`; 0: every one) of the run's corpus."""
    starts = corpus.splits.validation_starts(validation_sample(corpus.splits.num_val, windows))
    return len(starts) * corpus.config.seq_len, target_chars(corpus, starts)


def evaluate_run(run_dir: Path, data: str | None = None, which: str = "best",
                 precision: str | None = None) -> Evaluation:
    """Score every validation window of the run's corpus with its `which` checkpoint, in
    `precision` (default: the run's own) on the products the run trained with where they can be
    had (else XLA's), through training's own validation pass."""
    folder = RunFolder(run_dir)
    precision = precision or folder.recorded("precision")
    corpus = open_corpus(run_dir, data)
    run = load_run(run_dir, which, precision)
    cfg = run.config
    try:
        products = products_for(precision, folder.recorded("products"), cfg)[0]
    except UserError:  # the vendor GEMM is not here
        products = "xla"
    mesh = data_mesh()
    check_batch_fits(cfg.batch_size, mesh)
    state = create_train_state(cfg, precision, products=products).with_eval_params(run.params)
    dataset = Dataset(replicate(jax.numpy.asarray(corpus.ids), mesh), corpus.splits,
                      corpus.tokenizer)
    every_window = Clock.of(cfg.replace(eval_windows=0), corpus.splits)  # not training's sample
    validation = Loop(cfg=cfg, data=dataset, mesh=mesh, clock=every_window, show_progress=False)
    mean = evaluate(validation, replicate(state, mesh))
    tokens, chars = validation_characters(corpus)
    return Evaluation(mean * tokens, tokens, chars)


def evaluation_markdown(run_dir: Path, which: str, evaluation: Evaluation) -> str:
    return "\n".join([
        f"{run_dir} ({which} checkpoint), every validation window:",
        f"  validation perplexity   {evaluation.perplexity:.2f}",
        f"  nats per token          {evaluation.nats_per_token:.4f}",
        f"  nats per character      {evaluation.nats_per_char:.4f}",
        f"  target tokens           {evaluation.tokens:,}",
        f"  their characters        {evaluation.chars:,} "
        f"({evaluation.chars / evaluation.tokens:.3f} per token)", ""])
