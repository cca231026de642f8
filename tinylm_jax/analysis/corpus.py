"""A run's corpus as the analyses read it: the run's own tokenizer, character offsets, and the
spacing model that decodes its tokens back to text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from tinylm_jax.analysis.detokenize import Spacing
from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.data import (
    Splits,
    encode_corpus,
    file_sha256,
    gather_windows,
    read_corpus,
    resolve_corpus,
)
from tinylm_jax.run.folder import RunFolder


@dataclass(frozen=True)
class RunCorpus:
    """A run's corpus, tokenised with the run's own tokenizer, with character offsets."""

    config: ExperimentConfig
    tokenizer: Tokenizer
    text: str
    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (T, 2) character span of each token in `text`
    splits: Splits
    spacing: Spacing  # learned from the tokens before the first validation window

    @classmethod
    def build(cls, cfg: ExperimentConfig, tokenizer: Tokenizer, text: str) -> RunCorpus:
        encoded = encode_corpus(text, tokenizer, cfg)
        ids, offsets, cut = encoded.ids, encoded.offsets, encoded.splits.num_train
        spacing = Spacing.fit(text, ids[:cut], offsets[:cut], tokenizer.get_vocab_size())
        return cls(cfg, tokenizer, text, ids, offsets, encoded.splits, spacing)

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
        return self.text[self.offsets[start, 0]:self.offsets[start + length - 1, 1]]

    def decode(self, ids: list[int] | np.ndarray, after: int | None = None) -> str:
        return self.spacing.decode(self.tokenizer, ids, after)

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
    if record.get("corpus_sha256") != file_sha256(path):
        raise UserError(f"{path}: not the corpus {run_dir} was trained on (sha256 differs); "
                        "pass that one with --data")
    return RunCorpus.build(cfg, tokenizer, text)
