"""Text generation and next-token probabilities, compiled once per model.

The context is a fixed-shape (1, L) window, L = the model's `max_seq_len`, holding the last
`length <= L` tokens left-aligned; positions past `length` hold padding that causal attention
never lets the read position see. Once the window is full it slides by one token per step, so
positions always count from the window's start, as in the reference's `ids[:, -seq_len:]`. Every
step runs the same compiled function whatever the prompt, the step or the sampling settings.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array,
                  top_k: jax.Array) -> jax.Array:
    """One token id from `logits` (V,): greedy when `temperature` is 0, else a draw from
    softmax(logits / temperature) restricted to the `top_k` most likely (0: all; ties at the
    k-th value are kept)."""
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_largest = jnp.sort(logits)[vocab - k]
    kept = jnp.where(logits >= kth_largest, logits, -jnp.inf)
    drawn = jax.random.categorical(key, kept / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits)).astype(jnp.int32)


def context_window(ids: list[int] | np.ndarray, context_len: int) -> tuple[np.ndarray, int]:
    """The last `context_len` of `ids`, left-aligned in a (1, context_len) int32 window."""
    ids = np.asarray(ids, dtype=np.int32)[-context_len:]
    if ids.size == 0:
        raise ValueError("the prompt must hold at least one token")
    window = np.zeros((1, context_len), np.int32)
    window[0, :ids.size] = ids
    return window, int(ids.size)


@functools.partial(jax.jit, static_argnames="model")
def next_token_logits(model: nn.Module, params: Any, window: jax.Array, length: jax.Array
                      ) -> jax.Array:
    """Logits (V,) float32 for the token after the first `length` tokens of `window` (1, L)."""
    logits = model.apply({"params": params}, window)  # (1, L, V)
    return logits[0, length - 1].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="model")
def sample_step(model: nn.Module, params: Any, window: jax.Array, length: jax.Array,
                key: jax.Array, temperature: jax.Array, top_k: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw the next token and append it: (window, length, token), the window slid if full."""
    token = sample_logits(next_token_logits(model, params, window, length), key, temperature,
                          top_k)
    context_len = window.shape[1]
    appended = window.at[0, jnp.minimum(length, context_len - 1)].set(token)
    slid = jnp.roll(window, -1, axis=1).at[0, -1].set(token)
    window = jnp.where(length < context_len, appended, slid)
    return window, jnp.minimum(length + 1, context_len), token


def generate(model: nn.Module, params: Any, prompt_ids: list[int] | np.ndarray,
             max_new_tokens: int, temperature: float = 0.9, top_k: int = 0, seed: int = 0
             ) -> list[int]:
    """The prompt's ids followed by `max_new_tokens` sampled ones; the same seed, the same text.

    `model` needs `max_seq_len` (the context length) and returns logits (1, L, V) from ids (1, L).
    """
    window, length = context_window(prompt_ids, model.max_seq_len)
    window, length = jnp.asarray(window), jnp.int32(length)
    key = jax.random.key(seed)
    settings = (jnp.float32(temperature), jnp.int32(top_k))
    new_tokens = []
    for step in range(max_new_tokens):
        window, length, token = sample_step(model, params, window, length,
                                            jax.random.fold_in(key, step), *settings)
        new_tokens.append(token)
    return [int(i) for i in prompt_ids] + [int(t) for t in jax.device_get(new_tokens)]


def top_next_tokens(model: nn.Module, params: Any, prompt_ids: list[int] | np.ndarray,
                    k: int = 5) -> list[tuple[int, float]]:
    """The `k` likeliest next tokens after the prompt's last `max_seq_len` ids, with their
    probabilities, most likely first."""
    window, length = context_window(prompt_ids, model.max_seq_len)
    logits = next_token_logits(model, params, jnp.asarray(window), jnp.int32(length))
    probs = np.asarray(jax.nn.softmax(logits), dtype=np.float64)
    best = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in best]


def probability_bar(prob: float, width: int = 40) -> str:
    """The reference's bar: one mark per 1/40 of probability."""
    return "#" * int(prob * width)
