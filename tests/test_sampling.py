"""The sampler on fake models whose logits are known: greedy, top-k, seeds, sliding, compilation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinylm_jax.analysis.sampling import (
    context_window,
    generate,
    probability_bar,
    sample_logits,
    sample_step,
    top_next_tokens,
)

VOCAB = 7


TRACES = []  # one entry per trace of a fake model, i.e. per compilation that runs it


class NextTokenTable(nn.Module):
    """Logits of the next token depend only on the current one: row `table[id]`."""

    max_seq_len: int = 4

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        TRACES.append(self.max_seq_len)
        table = self.param("table", nn.initializers.zeros, (VOCAB, VOCAB))
        return table[ids]  # (B, L, V)


def successor_table(margin: float = 10.0) -> dict:
    """Token i is followed by (i + 1) % VOCAB by a wide margin."""
    table = np.zeros((VOCAB, VOCAB), np.float32)
    table[np.arange(VOCAB), (np.arange(VOCAB) + 1) % VOCAB] = margin
    return {"table": jnp.asarray(table)}


def test_greedy_follows_the_argmax_past_the_context_length():
    model = NextTokenTable()
    ids = generate(model, successor_table(), [3], max_new_tokens=12, temperature=0.0)
    # 12 new tokens overrun the 4-token window many times: the read position must slide.
    assert ids == [(3 + i) % VOCAB for i in range(13)]


def test_the_window_fills_then_slides_by_one_token():
    model, params = NextTokenTable(), successor_table()
    window, length = context_window([1, 2], model.max_seq_len)
    window, length = jnp.asarray(window), jnp.int32(length)
    seen = []
    for step in range(4):
        window, length, token = sample_step(model, params, window, length, jax.random.key(step),
                                            jnp.float32(0.0), jnp.int32(0))
        seen.append((np.asarray(window)[0].tolist(), int(length), int(token)))
    assert seen == [([1, 2, 3, 0], 3, 3), ([1, 2, 3, 4], 4, 4), ([2, 3, 4, 5], 4, 5),
                    ([3, 4, 5, 6], 4, 6)]


def test_greedy_reads_the_last_prompt_token_not_the_padding():
    model = NextTokenTable(max_seq_len=8)
    assert generate(model, successor_table(), [5, 1], 1, temperature=0.0) == [5, 1, 2]


def test_top_k_never_samples_outside_the_k_likeliest():
    logits = jnp.array([0.5, 2.0, -1.0, 1.5, 3.0, 0.0, 1.0])  # top 3: ids 4, 1, 3
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(lambda k: sample_logits(logits, k, jnp.float32(5.0), jnp.int32(3)))(keys)
    assert set(np.asarray(draws).tolist()) == {1, 3, 4}


def test_sampling_follows_the_tempered_softmax():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    keys = jax.random.split(jax.random.key(1), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, jnp.float32(1.0),
                                                        jnp.int32(0)))(keys))
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / len(draws), [0.6, 0.3, 0.1],
                               atol=0.015)
    cold = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, jnp.float32(0.05),
                                                       jnp.int32(0)))(keys))
    assert np.mean(cold == 0) > 0.99  # a low temperature sharpens towards the argmax


def test_the_same_seed_gives_the_same_text_and_another_seed_another():
    model, params = NextTokenTable(), successor_table(margin=0.0)  # all tokens equally likely
    one = generate(model, params, [0], 30, temperature=1.0, seed=7)
    assert one == generate(model, params, [0], 30, temperature=1.0, seed=7)
    assert one != generate(model, params, [0], 30, temperature=1.0, seed=8)
    assert set(one) == set(range(VOCAB))


def test_generation_compiles_once_whatever_the_prompt_and_settings():
    model = NextTokenTable(max_seq_len=6)  # a context length no other test compiles
    params = successor_table()
    generate(model, params, [1], 10, temperature=0.0)
    generate(model, params, [1, 2, 3, 4, 5, 6, 0, 1], 10, temperature=0.7, top_k=2, seed=3)
    assert TRACES.count(6) == 1  # 20 tokens, two prompts, two settings: one trace


def test_context_window_keeps_the_last_tokens_left_aligned():
    window, length = context_window([1, 2, 3], 5)
    assert window.tolist() == [[1, 2, 3, 0, 0]] and length == 3
    window, length = context_window(list(range(1, 8)), 5)
    assert window.tolist() == [[3, 4, 5, 6, 7]] and length == 5
    with pytest.raises(ValueError, match="at least one token"):
        context_window([], 5)


def test_top_next_tokens_ranks_the_softmax():
    table = np.zeros((VOCAB, VOCAB), np.float32)
    table[2] = np.log([0.05, 0.4, 0.05, 0.3, 0.1, 0.05, 0.05])
    ranked = top_next_tokens(NextTokenTable(), {"table": jnp.asarray(table)}, [0, 2], k=3)
    assert [i for i, _ in ranked] == [1, 3, 4]
    np.testing.assert_allclose([p for _, p in ranked], [0.4, 0.3, 0.1], rtol=1e-5)


def test_probability_bar_is_the_references():
    assert probability_bar(0.138) == "#####" and probability_bar(0.02) == ""
