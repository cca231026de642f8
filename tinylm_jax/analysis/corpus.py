"""A run's corpus as the analyses read it: the run's own tokenizer, its ids from the token cache
(nothing re-tokenised), character offsets for the spans an analysis shows, and the spacing model
that decodes its tokens back to text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from tinylm_jax.analysis.detokenize import Spacing
from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.data import (
    CORPUS_SHA256,
    Splits,
    corpus_tokens,
    file_sha256,
    gather_windows,
    is_byte_level,
    read_corpus,
    resolve_corpus,
    text_sha256,
    token_offsets,
)
from tinylm_jax.core.token_cache import CorpusTokens
from tinylm_jax.run.folder import RunFolder

# The spacing model learns from at most this many tokens of the training text, and is scored on
# at most this many of the validation text (the reference's corpus: all of both).
SPACING_TOKENS = 1_000_000


@dataclass(frozen=True)
class RunCorpus:
    """A run's corpus, tokenised with the run's own tokenizer."""

    config: ExperimentConfig
    tokenizer: Tokenizer
    text: str
    tokens: CorpusTokens  # the ids as cached, and the pieces they were encoded in
    ids: np.ndarray  # (T,) int32
    splits: Splits
    # Learned from the first tokens of the training text; None for a byte-level tokenizer,
    # whose tokens carry their own whitespace.
    spacing: Spacing | None
    sha256: str  # the corpus's

    @classmethod
    def build(cls, cfg: ExperimentConfig, tokenizer: Tokenizer, text: str,
              corpus_sha256: str | None = None) -> RunCorpus:
        sha256 = corpus_sha256 or text_sha256(text)
        tokens = corpus_tokens(text, tokenizer, sha256)
        ids = np.asarray(tokens.ids, dtype=np.int32)
        splits = Splits.of(len(ids), cfg.seq_len, cfg.train_fraction)
        spacing = None
        if not is_byte_level(tokenizer):
            cut = min(splits.num_train, SPACING_TOKENS)
            spacing = Spacing.fit(text, ids[:cut], token_offsets(tokenizer, text, tokens, 0, cut),
                                  tokenizer.get_vocab_size())
        return cls(cfg, tokenizer, text, tokens, ids, splits, spacing, sha256)

    @property
    def is_reference(self) -> bool:
        """Whether this is the reference's corpus, Tiny Shakespeare."""
        return self.sha256 == CORPUS_SHA256

    def offsets(self, first: int, stop: int) -> np.ndarray:
        """The character spans (stop - first, 2) in `text` of tokens [first, stop)."""
        return token_offsets(self.tokenizer, self.text, self.tokens, first, stop)

    def window_start(self, index: int) -> int:
        """Token position of validation window `index` (0: the reference's first validation
        window)."""
        if not 0 <= index < self.splits.num_val:
            raise UserError(f"--window must lie in [0, {self.splits.num_val - 1}], got {index}")
        return int(self.splits.validation_starts([index])[0])

    def validation_window(self, index: int) -> tuple[int, np.ndarray]:
        """Validation window `index`: its token position and its ids (L,)."""
        start = self.window_start(index)
        return start, np.asarray(gather_windows(self.ids, np.array([start]),
                                                self.splits.seq_len)[0][0])

    def source_text(self, start: int, length: int) -> str:
        """The corpus text spanned by `length` tokens from `start`, spacing and all."""
        spans = self.offsets(start, start + length)
        return self.text[spans[0, 0]:spans[-1, 1]]

    def decode(self, ids: list[int] | np.ndarray, after: int | None = None) -> str:
        """Text of `ids` (continuing a text that ends with token `after`, if given): the byte-level
        tokenizer's decoder restores it exactly; the reference's needs the spacing model."""
        if self.spacing is None:
            return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
        return self.spacing.decode(self.tokenizer, ids, after)

    def token_text(self, token: int) -> str:
        """How a token reads: its text (a byte-level token's string spells its bytes)."""
        if self.spacing is None:
            return self.tokenizer.decode([token], skip_special_tokens=False)
        return self.tokenizer.id_to_token(token)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids; refuses text the tokenizer cannot represent rather than feed [UNK]."""
        encoding = self.tokenizer.encode(prompt)
        unknown = self.tokenizer.token_to_id("[UNK]")
        if not encoding.ids:
            raise UserError(f"text {prompt!r} holds no tokens")
        spans = zip(encoding.ids, encoding.offsets, strict=True)
        missing = sorted({prompt[s:e] for i, (s, e) in spans if i == unknown})
        if missing:
            raise UserError(f"text {prompt!r} has characters the run's tokenizer never saw: "
                            f"{' '.join(missing)}")
        return list(encoding.ids)


def open_corpus(run_dir: Path, data: str | None = None) -> RunCorpus:
    """The corpus a run was trained on (found like training finds it), checked by sha256."""
    folder = RunFolder(run_dir)
    cfg, record = folder.read_record()
    tokenizer = folder.read_tokenizer()
    path = resolve_corpus(data)
    text = read_corpus(path)
    sha256 = file_sha256(path)
    if record.get("corpus_sha256") != sha256:
        raise UserError(f"{path}: not the corpus {run_dir} was trained on (sha256 differs); "
                        "pass that one with --data")
    return RunCorpus.build(cfg, tokenizer, text, sha256)
