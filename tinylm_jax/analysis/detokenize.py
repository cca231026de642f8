"""Readable text from token ids, although the tokenizer forgets where the whitespace was.

The reference's Whitespace pre-tokenizer splits on whitespace and keeps no trace of it, so
`tokenizer.decode` puts one space between every two tokens ("lo se thee ,"). Nothing in the ids
says whether a boundary had a space, a newline or nothing at all. The reference patched the
worst of it with a punctuation clean-up. `Spacing` instead learns, from the corpus, which
separator most often sits between each pair of tokens (backing off to what most often precedes
the second token), so subwords join ("lose"), speaker names end their line ("MENENIUS:\n") and
punctuation hugs its word. It is a best guess: what it cannot know (a line break mid-sentence, a
blank line between speeches) it gets wrong, and rare pairs fall back to the commonest case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

UNSEEN = -1


def reference_separator(previous: str, token: str) -> str:
    """The reference's `clean_generated` as a rule per boundary: a space, except before . , ! ? : ;
    and inside parentheses; every newline becomes a space."""
    if token[0] in ".,!?:;)" or previous[-1] == "(":
        return ""
    return " "


@dataclass(frozen=True)
class Spacing:
    """The commonest separator per (previous token, token), learned from a tokenised text."""

    separators: tuple[str, ...]  # distinct separators, commonest first ("" and " " lead)
    pair_choice: np.ndarray  # (V, V) int32: index into `separators` per pair, UNSEEN if never seen
    token_choice: np.ndarray  # (V,) int32: commonest separator before each token, or UNSEEN

    @classmethod
    def fit(cls, text: str, ids: np.ndarray, offsets: np.ndarray, vocab_size: int) -> Spacing:
        """Learn from `ids` (T,) and their character `offsets` (T, 2) into `text`."""
        kinds, kind_index, counts = np.unique(_gaps(text, offsets), return_inverse=True,
                                              return_counts=True)
        by_count = np.argsort(-counts, kind="stable")
        rank_of_kind = np.empty_like(by_count)
        rank_of_kind[by_count] = np.arange(len(by_count))
        gap_kind = rank_of_kind[kind_index]  # separators renumbered commonest first
        previous, following = ids[:-1].astype(np.int64), ids[1:].astype(np.int64)
        pair_choice = _commonest(previous * vocab_size + following, gap_kind, vocab_size ** 2)
        token_choice = _commonest(following, gap_kind, vocab_size)
        return cls(tuple(str(k) for k in kinds[by_count]),
                   pair_choice.reshape(vocab_size, vocab_size), token_choice)

    def separator(self, previous: int, token: int) -> str:
        """The separator guessed between token ids `previous` and `token`."""
        choice = self.pair_choice[previous, token]
        if choice == UNSEEN:
            choice = self.token_choice[token]
        return self.separators[choice] if choice != UNSEEN else " "

    def decode(self, tokenizer: Tokenizer, ids: list[int] | np.ndarray,
               after: int | None = None) -> str:
        """The token strings of `ids` joined by the predicted separators. With `after`, the ids
        continue a text whose last token is `after`, and the result starts with the separator."""
        pieces, previous = [], after
        for token in (int(i) for i in ids):
            if previous is not None:
                pieces.append(self.separator(previous, token))
            pieces.append(tokenizer.id_to_token(token))
            previous = token
        return "".join(pieces)


def _commonest(keys: np.ndarray, kinds: np.ndarray, num_keys: int) -> np.ndarray:
    """Per key in [0, num_keys), the kind it occurs with most often (ties: the commoner kind)."""
    choice = np.full(num_keys, UNSEEN, dtype=np.int32)
    pairs, counts = np.unique(np.stack([keys, kinds], axis=1), axis=0, return_counts=True)
    # Sort by key, then by count descending, then by kind: the first row per key wins.
    order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    pairs = pairs[order]
    first = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
    choice[pairs[first, 0]] = pairs[first, 1]
    return choice


def _gaps(text: str, offsets: np.ndarray) -> list[str]:
    """The text between each two consecutive tokens: T - 1 separators for (T, 2) offsets."""
    return [text[end:start] for end, start in zip(offsets[:-1, 1], offsets[1:, 0], strict=True)]


def separator_accuracy(text: str, ids: np.ndarray, offsets: np.ndarray, tokenizer: Tokenizer,
                       spacing: Spacing) -> dict[str, float]:
    """How often each method restores the true separator at the token boundaries of `text`:
    exactly, and as whitespace-or-not (which forgives a newline written as a space)."""
    tokens = [tokenizer.id_to_token(int(i)) for i in ids]
    pairs = list(zip(ids[:-1].tolist(), ids[1:].tolist(), strict=True))
    truth = np.array(_gaps(text, offsets), dtype=object)
    guesses = {
        "spacing": [spacing.separator(a, b) for a, b in pairs],
        "reference": [reference_separator(tokens[i], tokens[i + 1]) for i in range(len(pairs))],
    }
    scores = {}
    for method, guess in guesses.items():
        guess = np.array(guess, dtype=object)
        scores[f"{method}_exact"] = float(np.mean(guess == truth))
        scores[f"{method}_space"] = float(np.mean((guess != "") == (truth != "")))
    return scores
