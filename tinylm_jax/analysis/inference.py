"""Reference section 4.3 (notebook 6g-6h): the likeliest next tokens after a prompt, and a
validation window continued by the model beside its real text."""

from __future__ import annotations

from dataclasses import dataclass

from tinylm_jax.analysis.corpus import RunCorpus
from tinylm_jax.analysis.sampling import generate, probability_bar, top_next_tokens
from tinylm_jax.run.checkpoint import LoadedRun

# The prompts of the reference's top-k table (its notebook misspells the last one "CURIOLANUS:").
REFERENCE_PROMPTS = ("MENENIUS:", "BRUTUS:", "CORIOLANUS:")


def top_k_table(run: LoadedRun, corpus: RunCorpus, prompts: tuple[str, ...] = REFERENCE_PROMPTS,
                k: int = 5) -> str:
    """The reference's printout: per prompt, the k likeliest next tokens with bars."""
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
