"""Reference section 4.3 (notebook 6g-6h): the likeliest next tokens after a prompt, and a
validation window continued by the model beside its real text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm_jax.analysis.corpus import RunCorpus
from tinylm_jax.analysis.sampling import generate, probability_bar, top_next_tokens
from tinylm_jax.core.config import UserError
from tinylm_jax.run.checkpoint import LoadedRun

# The prompts of the reference's top-k table (its notebook misspells the last one "CURIOLANUS:").
REFERENCE_PROMPTS = ("MENENIUS:", "BRUTUS:", "CORIOLANUS:")
PROMPT_WORDS = 3  # a prompt drawn from a corpus: the first words of a line, at most this many
PROMPT_CHARS = 40  # and at most this many characters
PROMPT_LINES = 100  # lines tried after each drawn position for one the tokenizer can encode


def corpus_prompts(corpus: RunCorpus, count: int = 3, seed: int = 0) -> tuple[str, ...]:
    """The prompts of the top-k table and the sample: the reference's for its own corpus (they
    name its characters); for any other, the first words of lines of the corpus's validation
    text at `count` seeded positions, the same for every run on the corpus."""
    if corpus.is_reference:
        return REFERENCE_PROMPTS
    splits, text = corpus.splits, corpus.text
    begin = int(corpus.offsets(splits.num_train, splits.num_train + 1)[0, 0])
    positions = np.sort(np.random.default_rng(seed).integers(begin, len(text), count))
    prompts: list[str] = []
    for position in positions.tolist():
        prompt = _line_prompt(corpus, position)
        if prompt is not None and prompt not in prompts:
            prompts.append(prompt)
    if not prompts:
        raise UserError("no line of the validation text makes a prompt the run's tokenizer can "
                        "encode; pass one with --prompt")
    return tuple(prompts)


def _line_prompt(corpus: RunCorpus, position: int) -> str | None:
    """The first words of the first line after `position` that has any and that the run's
    tokenizer encodes without an unknown character; None if none in PROMPT_LINES lines."""
    text = corpus.text
    for _ in range(PROMPT_LINES):
        start = text.find("\n", position) + 1
        if start == 0:
            return None
        end = text.find("\n", start)
        position = len(text) if end < 0 else end
        prompt = " ".join(text[start:position].split()[:PROMPT_WORDS])[:PROMPT_CHARS].strip()
        try:
            if prompt and corpus.encode_prompt(prompt):
                return prompt
        except UserError:  # a character the tokenizer never saw: try the next line
            pass
    return None


def top_k_table(run: LoadedRun, corpus: RunCorpus, prompts: tuple[str, ...] | None = None,
                k: int = 5) -> str:
    """The reference's printout: per prompt (default `corpus_prompts`), the k likeliest next
    tokens with bars."""
    blocks = []
    for prompt in prompts or corpus_prompts(corpus):
        ranked = top_next_tokens(run.model, run.params, corpus.encode_prompt(prompt), k)
        lines = [f"Prompt: {prompt!r}"]
        lines += [f"  {rank}. {corpus.token_text(i)!r:15} {p:.3f} {probability_bar(p)}"
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
    """The reference's comparison: a validation window's first min(25, L/2) tokens as the prompt,
    continued to the window's length, beside the window's real text."""
    seq_len = corpus.config.seq_len
    start, window_ids = corpus.validation_window(window)
    prompt_len = max(1, min(25, seq_len // 2))
    ids = generate(run.model, run.params, window_ids[:prompt_len], seq_len - prompt_len,
                   temperature=temperature, seed=seed)
    prompt = corpus.source_text(start, prompt_len)
    # The prompt as the corpus has it; only the continuation's spacing is guessed.
    continuation = corpus.decode(ids[prompt_len:], after=ids[prompt_len - 1])
    return Continuation(prompt_len, prompt, corpus.source_text(start, seq_len),
                        prompt + continuation)
