"""What the seed report shows about a finished run, as numbers and Markdown.

Everything here reads a run folder (and the corpus it was trained on) and writes nothing; the
commands in `commands.py` put the results in files and `plots.py` draws them.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from tinylm_jax.attention import EPOCH_FIELDS, EPOCHS_FILE
from tinylm_jax.checkpoint import LoadedRun, read_run_record, read_run_tokenizer
from tinylm_jax.config import ExperimentConfig, UserError
from tinylm_jax.data import Splits, file_sha256, read_corpus, resolve_corpus
from tinylm_jax.detokenize import Spacing, separator_accuracy
from tinylm_jax.experiment import HISTORY_FIELDS, seed_experiment
from tinylm_jax.sampling import generate, probability_bar, top_next_tokens

# The prompts of the seed's top-k table (its notebook misspells the last one "CURIOLANUS:").
SEED_PROMPTS = ("MENENIUS:", "BRUTUS:", "CORIOLANUS:")


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
        encoding = tokenizer.encode(text)
        ids = np.asarray(encoding.ids, dtype=np.int32)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        splits = Splits.of(len(ids), cfg.seq_len, cfg.train_fraction)
        cut = splits.num_train
        spacing = Spacing.fit(text, ids[:cut], offsets[:cut], tokenizer.get_vocab_size())
        return cls(cfg, tokenizer, text, ids, offsets, splits, spacing)

    def window_start(self, index: int) -> int:
        """Token position of validation window `index` (0: the seed's first validation window)."""
        if not 0 <= index < self.splits.num_val:
            raise UserError(f"--window must lie in [0, {self.splits.num_val - 1}], got {index}")
        return self.splits.num_train + index

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
    cfg, record = read_run_record(run_dir)
    tokenizer = read_run_tokenizer(run_dir)
    path = resolve_corpus(data)
    text = read_corpus(path)
    if record.get("corpus_sha256") not in (None, file_sha256(path)):
        raise UserError(f"{path}: not the corpus {run_dir} was trained on (sha256 differs); "
                        "pass that one with --data")
    return RunCorpus.build(cfg, tokenizer, text)


# --- Tokenizer study (seed section 2) ------------------------------------------------------------

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
    """The seed's counts: `Counter.most_common`, so ties keep first-seen order as in the seed."""
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
              f"| seed's punctuation clean-up | {sc['seed_exact']:.1%} | {sc['seed_space']:.1%} |"]
    return "\n".join(lines) + "\n"


# --- Training curves (seed figures 2-4, Table 1) -------------------------------------------------

def _read_epoch_rows(path: Path, fields: tuple[str, ...], what: str,
                     text_fields: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A per-epoch CSV's rows: `text_fields` as written, epoch as int, the rest as floats."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [{key: row[key] if key in text_fields else float(row[key]) for key in fields}
                    for row in csv.DictReader(f)]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: unreadable {what} ({err!r})") from None
    if not rows:
        raise UserError(f"{path}: no epochs recorded")
    for row in rows:
        row["epoch"] = int(row["epoch"])
    return rows


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """A run's `history.csv` as rows of numbers (epoch as int)."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        raise UserError(f"{run_dir}: no history.csv (has the run finished an epoch?)")
    return _read_epoch_rows(path, HISTORY_FIELDS, "history")


def read_attention_by_epoch(run_dir: Path) -> list[dict[str, Any]]:
    """A run's `attention_by_epoch.csv`: statistics as floats, layer and head as written."""
    path = Path(run_dir) / EPOCHS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {EPOCHS_FILE} (the run predates the per-epoch "
                        "attention record)")
    return _read_epoch_rows(path, EPOCH_FIELDS, "attention record", ("layer", "head"))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no summary.json (the run has not finished)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{path}: unreadable summary ({err})") from None


@dataclass(frozen=True)
class FinishedRun:
    """One of several finished runs, as the analyses that compare them name it."""

    run_dir: Path
    name: str  # the folder's name: the seed's tables know runs named baseline, medium, wider
    label: str  # legend label: the experiment, with the folder where two runs share one
    summary: dict[str, Any]

    @property
    def seed_experiment(self) -> str | None:
        """The seed's experiment this run reproduces, if any."""
        return seed_experiment(self.name, self.summary["experiment"])


def read_finished_runs(run_dirs: list[Path]) -> list[FinishedRun]:
    """Finished runs with their summaries; their folders must have distinct names."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) != len(names):
        raise UserError(f"run folders need distinct names to be compared, got {', '.join(names)}")
    summaries = [read_summary(d) for d in run_dirs]
    experiments = [summary["experiment"] for summary in summaries]
    return [FinishedRun(Path(d), name, e if experiments.count(e) == 1 else f"{e} ({name})", s)
            for d, name, e, s in zip(run_dirs, names, experiments, summaries, strict=True)]


def seed_partners(runs: list[FinishedRun]) -> dict[str, str]:
    """Run label -> the seed experiment it reproduces, each seed experiment for its first run
    only: the seed's curve is drawn once, in that run's colour."""
    partners: dict[str, str] = {}
    for run in runs:
        seed = run.seed_experiment
        if seed is not None and seed not in partners.values():
            partners[run.label] = seed
    return partners


# --- Inference (seed section 4.3, notebook 6g-6h) -------------------------------------------------

def top_k_table(run: LoadedRun, corpus: RunCorpus, prompts: tuple[str, ...] = SEED_PROMPTS,
                k: int = 5) -> str:
    """The seed's printout: per prompt, the k likeliest next tokens with bars."""
    blocks = []
    for prompt in prompts:
        ranked = top_next_tokens(run.model, run.params, corpus.encode_prompt(prompt), k)
        lines = [f"Prompt: {prompt!r}"]
        lines += [f"  {rank}. {corpus.tokenizer.id_to_token(i)!r:15} {p:.3f} {probability_bar(p)}"
                  for rank, (i, p) in enumerate(ranked, 1)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


@dataclass(frozen=True)
class Continuation:
    prompt_len: int  # tokens of the window used as the prompt
    prompt: str  # the corpus text of those tokens
    actual: str  # the corpus text of the whole window
    predicted: str  # the prompt followed by the model's continuation


def predicted_vs_actual(run: LoadedRun, corpus: RunCorpus, window: int = 0,
                        temperature: float = 0.9, seed: int = 0) -> Continuation:
    """The seed's comparison: a validation window's first min(25, L/2) tokens as the prompt,
    continued to the window's length, beside the window's real text."""
    seq_len = corpus.config.seq_len
    start = corpus.window_start(window)
    prompt_len = max(1, min(25, seq_len // 2))
    ids = generate(run.model, run.params, corpus.ids[start:start + prompt_len],
                   seq_len - prompt_len, temperature=temperature, seed=seed)
    prompt = corpus.source_text(start, prompt_len)
    # The prompt as the corpus has it; only the continuation's spacing is guessed.
    continuation = corpus.decode(ids[prompt_len:], after=ids[prompt_len - 1])
    return Continuation(prompt_len, prompt, corpus.source_text(start, seq_len),
                        prompt + continuation)

