"""Reference section 2: the corpus and its 500-entry BPE, counted, and how well decoding restores
the text's spacing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tinylm_jax.analysis.corpus import RunCorpus
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
    spacing_scores: dict[str, float]  # separator_accuracy on the validation text


def tokenizer_study(corpus: RunCorpus, num_tokens: int = 20, num_words: int = 100
                    ) -> TokenizerStudy:
    """The reference's counts: `Counter.most_common`, so ties keep first-seen order as in the
    reference."""
    tokenizer, text = corpus.tokenizer, corpus.text
    top_ids = Counter(corpus.ids.tolist()).most_common(num_tokens)
    words = Counter(word.lower() for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text))
    top_words = words.most_common(num_words)
    vocab = tokenizer.get_vocab()
    val = slice(corpus.splits.num_train, None)
    return TokenizerStudy(
        num_chars=len(text), distinct_chars=len(set(text)), num_tokens=len(corpus.ids),
        vocab_size=tokenizer.get_vocab_size(),
        top_tokens=[(tokenizer.id_to_token(i), n) for i, n in top_ids],
        top_words=top_words,
        missed_words=[word for word, _ in top_words if word not in vocab],
        spacing_scores=separator_accuracy(text, corpus.ids[val], corpus.offsets[val], tokenizer,
                                          corpus.spacing))


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
    lines += ["", "## Decoding", "",
              "The pre-tokenizer drops whitespace, so decoded text must guess each token "
              "boundary's separator. On the validation text (learned from the training part):", "",
              "| Method | Exact separator | Whitespace or not |", "|---|---:|---:|",
              f"| corpus spacing model (this project) | {sc['spacing_exact']:.1%} | "
              f"{sc['spacing_space']:.1%} |",
              f"| reference's punctuation clean-up | {sc['reference_exact']:.1%} | "
              f"{sc['reference_space']:.1%} |"]
    return "\n".join(lines) + "\n"
