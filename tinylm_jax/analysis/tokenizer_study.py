"""Reference section 2: the corpus and its 500-entry BPE, counted, and how well decoding restores
the text's spacing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tinylm_jax.analysis.corpus import SPACING_TOKENS, RunCorpus
from tinylm_jax.analysis.detokenize import separator_accuracy


@dataclass(frozen=True)
class TokenizerStudy:
    num_chars: int
    distinct_chars: int
    num_tokens: int
    vocab_size: int
    top_tokens: list[tuple[str, int]]  # commonest BPE tokens and their counts
    top_words: list[tuple[str, int]]  # commonest lower-cased Whitespace pre-tokens
    missed_words: list[str]  # of `top_words`, those that are not a single BPE token
    # separator_accuracy on the validation text (its first SPACING_TOKENS tokens); empty for a
    # byte-level tokenizer, whose decoder restores the text exactly
    spacing_scores: dict[str, float]


def tokenizer_study(corpus: RunCorpus, num_tokens: int = 20, num_words: int = 100
                    ) -> TokenizerStudy:
    """The reference's counts: `Counter.most_common`, so ties keep first-seen order as in the
    reference."""
    tokenizer, text = corpus.tokenizer, corpus.text
    top_words = pre_token_counts(corpus).most_common(num_words)
    vocab = tokenizer.get_vocab()
    scores = {}
    if corpus.spacing is not None:
        first = corpus.splits.num_train
        stop = min(len(corpus.ids), first + SPACING_TOKENS)
        scores = separator_accuracy(text, corpus.ids[first:stop], corpus.offsets(first, stop),
                                    tokenizer, corpus.spacing)
    return TokenizerStudy(
        num_chars=len(text), distinct_chars=len(set(text)), num_tokens=len(corpus.ids),
        vocab_size=tokenizer.get_vocab_size(),
        top_tokens=[(tokenizer.id_to_token(i), n) for i, n in commonest(corpus.ids, num_tokens)],
        top_words=top_words,
        missed_words=[word for word, _ in top_words if word not in vocab],
        spacing_scores=scores)


def commonest(ids: np.ndarray, count: int) -> list[tuple[int, int]]:
    """`Counter(ids).most_common(count)` (ties in first-seen order), counted by numpy: a list of
    a large corpus's ids would take gigabytes."""
    values, first_seen, counts = np.unique(ids, return_index=True, return_counts=True)
    order = np.lexsort((first_seen, -counts))[:count]
    return [(int(values[i]), int(counts[i])) for i in order]


def pre_token_counts(corpus: RunCorpus) -> Counter[str]:
    """The lower-cased pre-tokens of the whole text, counted piece by piece (the pieces are cut
    where the pre-tokenizer cuts anyway), in first-seen order as one pass over the text."""
    words: Counter[str] = Counter()
    bounds = [*corpus.tokens.pieces[:, 0].tolist(), len(corpus.text)]
    for begin, end in zip(bounds[:-1], bounds[1:], strict=True):
        piece = corpus.tokenizer.pre_tokenizer.pre_tokenize_str(corpus.text[begin:end])
        words.update(word.lower() for word, _ in piece)
    return words


def md_token(token: str) -> str:
    """A token as a Markdown table cell: code-formatted, with its whitespace made visible."""
    shown = token.replace("\n", "\\n").replace("|", "\\|")
    return f"`{shown}`" if "`" not in shown else shown


def tokenizer_report(study: TokenizerStudy, figure_name: str) -> str:
    s = study
    captured = len(s.top_words) - len(s.missed_words)
    lines = [
        "# Tokenizer study", "",
        f"- Corpus: {s.num_chars:,} characters, {s.distinct_chars} distinct.",
        f"- BPE vocabulary: {s.vocab_size} entries (`[PAD]` and `[UNK]` included); the corpus "
        f"encodes to {s.num_tokens:,} tokens.", "",
        f"## The {len(s.top_tokens)} commonest tokens", "", f"![token frequencies]({figure_name})",
        "", "| Rank | Token | Count |", "|---:|---|---:|"]
    lines += [f"| {rank} | {md_token(tok)} | {n:,} |"
              for rank, (tok, n) in enumerate(s.top_tokens, 1)]
    lines += ["", "## Classical words vs BPE", "",
              f"Of the {len(s.top_words)} commonest lower-cased Whitespace pre-tokens, "
              f"**{captured}** are single BPE tokens; missed: "
              f"{', '.join(md_token(w) for w in s.missed_words) or 'none'}.", "",
              "| Rank | Word | Count | Single BPE token |", "|---:|---|---:|---|"]
    missed = set(s.missed_words)
    lines += [f"| {rank} | {md_token(w)} | {n:,} | {'no' if w in missed else 'yes'} |"
              for rank, (w, n) in enumerate(s.top_words, 1)]
    sc = s.spacing_scores
    if not sc:
        lines += ["", "## Decoding", "", "The tokens are byte-level: they keep their whitespace, "
                  "and the tokenizer's decoder restores the text exactly."]
        return "\n".join(lines) + "\n"
    lines += ["", "## Decoding", "",
              "The pre-tokenizer drops whitespace, so decoded text must guess each token "
              "boundary's separator. On the validation text (learned from the training part):", "",
              "| Method | Exact separator | Whitespace or not |", "|---|---:|---:|",
              f"| corpus spacing model (this project) | {sc['spacing_exact']:.1%} | "
              f"{sc['spacing_space']:.1%} |",
              f"| reference's punctuation clean-up | {sc['reference_exact']:.1%} | "
              f"{sc['reference_space']:.1%} |"]
    return "\n".join(lines) + "\n"
