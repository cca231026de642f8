"""Attention statistics per head: what the reference reads off its heatmaps, as numbers.

Per head, averaged over windows and over query positions q (keys k <= q), from the model's own
attention weights (B, H, L, L):
  mean_distance   sum_k w[q,k] (q - k): how far back the head looks (0: only itself)
  self_mass       w[q,q]
  prev_mass       w[q,q-1], averaged over q >= 1 only
  punct_mass      mass on keys that are punctuation tokens
  entropy         -sum_k w[q,k] ln w[q,k], in nats (0: one key; ln(q+1): uniform)
A uniform causal head, scored on the same windows, is the reference row. The analyses compute
them on any windows; `AttentionRecord`, an epoch hook of the training loop, records them at
initialisation (epoch 0) and after every epoch, on the same `STAT_WINDOWS` fixed validation
windows as the analyses' default (on 2 CPU cores shared with a training run: 0.2 s an epoch for
the baseline, 0.9 s for the wider model, after a 2 s compilation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.data import Dataset, Splits, gather_windows, padded_batches
from tinylm_jax.core.model import build_model
from tinylm_jax.core.parallel import local_replica
from tinylm_jax.core.train import TrainState, compute_dtype
from tinylm_jax.run.folder import RunFolder

STAT_NAMES = ("mean_distance", "self_mass", "prev_mass", "punct_mass", "entropy")
STAT_WINDOWS = 512  # validation windows the statistics average over, unless told otherwise


@functools.partial(jax.jit, static_argnames="model")
def attention_weights(model: nn.Module, params: Any, ids: jax.Array) -> jax.Array:
    """(layers, B, H, L, L) float32 attention weights for token ids (B, L)."""
    _, attention = model.apply({"params": params}, ids, return_attention=True)
    return jnp.stack(attention)


def is_punctuation(token: str) -> bool:
    """A token made only of punctuation marks (special tokens like [PAD] excluded)."""
    return bool(token) and not any(ch.isalnum() or ch.isspace() for ch in token)


def spread_window_starts(splits: Splits, num_windows: int) -> np.ndarray:
    """Token positions of `num_windows` validation windows spread evenly over the split."""
    num_val = splits.num_val
    if not 1 <= num_windows <= num_val:
        raise UserError(f"--windows must lie in [1, {num_val}], got {num_windows}")
    return splits.validation_starts(np.linspace(0, num_val - 1, num_windows).round())  # distinct


@dataclass(frozen=True)
class StatWindows:
    """The validation windows the statistics are averaged over."""

    ids: np.ndarray  # (N, L) token ids
    punct_keys: np.ndarray  # (N, L) bool, True on punctuation tokens

    @classmethod
    def spread(cls, tokens: np.ndarray, splits: Splits, tokenizer: Tokenizer, num_windows: int
               ) -> StatWindows:
        """`num_windows` windows of `tokens` (T,) spread evenly over the validation split."""
        starts = spread_window_starts(splits, num_windows)
        ids = np.asarray(gather_windows(tokens, starts, splits.seq_len)[0])
        punctuation = np.array([is_punctuation(tokenizer.id_to_token(i))
                                for i in range(tokenizer.get_vocab_size())])
        return cls(ids, punctuation[ids])


def window_statistics(weights: jax.Array, punct_keys: jax.Array) -> dict[str, jax.Array]:
    """Per window and head, the means over query positions: each (B, H) float32.

    weights (B, H, L, L) causal attention; punct_keys (B, L) bool, True on punctuation tokens.
    """
    length = weights.shape[-1]
    query = jnp.arange(length)[:, None]
    key = jnp.arange(length)[None, :]
    distance = jnp.sum(weights * (query - key), axis=-1)  # (B, H, L)
    self_mass = jnp.diagonal(weights, axis1=-2, axis2=-1)  # (B, H, L)
    prev_mass = jnp.diagonal(weights, offset=-1, axis1=-2, axis2=-1)  # (B, H, L-1): w[q, q-1]
    punct_mass = jnp.einsum("bhqk,bk->bhq", weights, punct_keys.astype(weights.dtype))
    logs = jnp.log(jnp.where(weights > 0, weights, 1.0))
    entropy = -jnp.sum(weights * logs, axis=-1)  # (B, H, L)
    per_query = (distance, self_mass, prev_mass, punct_mass, entropy)
    return {name: values.mean(axis=-1) for name, values in zip(STAT_NAMES, per_query, strict=True)}


def uniform_causal(batch: int, length: int) -> jax.Array:
    """(B, 1, L, L): every query spreads its mass evenly over itself and all earlier keys."""
    causal = jnp.tril(jnp.ones((length, length), jnp.float32))
    return jnp.broadcast_to(causal / causal.sum(-1, keepdims=True), (batch, 1, length, length))


@functools.partial(jax.jit, static_argnames="model")
def _batch_statistics(model: nn.Module, params: Any, ids: jax.Array, punct_keys: jax.Array
                      ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    per_layer = [window_statistics(w, punct_keys) for w in attention_weights(model, params, ids)]
    stats = {name: jnp.stack([s[name] for s in per_layer]) for name in STAT_NAMES}  # (layers, B, H)
    return stats, window_statistics(uniform_causal(*ids.shape), punct_keys)  # (B, 1)


def head_statistics(model: nn.Module, params: Any, windows: np.ndarray, punct_keys: np.ndarray,
                    batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Statistics averaged over `windows` (N, L) token ids: per head, each (layers, H), and for
    the uniform causal reference, one float each. `punct_keys` (N, L) marks punctuation."""
    parts, reference = [], []
    for keep, (ids, marks) in padded_batches((windows, punct_keys), batch_size):
        stats, uniform = _batch_statistics(model, params, ids, marks)
        parts.append({name: np.asarray(v)[:, :keep] for name, v in stats.items()})
        reference.append({name: np.asarray(v)[:keep] for name, v in uniform.items()})
    heads = {name: np.concatenate([p[name] for p in parts], axis=1).mean(axis=1, dtype=np.float64)
             for name in STAT_NAMES}
    uniform = {name: float(np.concatenate([r[name] for r in reference]).mean(dtype=np.float64))
               for name in STAT_NAMES}
    return heads, uniform


def stats_rows(heads: dict[str, np.ndarray], uniform: dict[str, float]) -> list[dict[str, Any]]:
    """One row per (layer, head), then per-layer means, then the uniform reference."""
    layers, num_heads = heads[STAT_NAMES[0]].shape
    rows = [{"layer": str(layer), "head": str(head),
             **{name: float(heads[name][layer, head]) for name in STAT_NAMES}}
            for layer in range(layers) for head in range(num_heads)]
    rows += [{"layer": str(layer), "head": "mean",
              **{name: float(heads[name][layer].mean()) for name in STAT_NAMES}}
             for layer in range(layers)]
    rows.append({"layer": "uniform", "head": "-", **uniform})
    return rows


@dataclass(frozen=True)
class AttentionRecord:
    """The training loop's epoch hook (`run.loop.EpochHook`) that records the `stats_rows` of the
    params on fixed validation windows: at initialisation as epoch 0, then after every epoch.
    Its file, attention_by_epoch.csv, is read back by `read_attention_record`."""

    model: nn.Module  # the run's own model (its precision's path)
    windows: StatWindows
    name: ClassVar[str] = "attention_by_epoch"
    fields: ClassVar[tuple[str, ...]] = ("epoch", "layer", "head", *STAT_NAMES)

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, precision: str, data: Dataset,
                num_windows: int = STAT_WINDOWS) -> AttentionRecord:
        windows = StatWindows.spread(data.tokens, data.splits, data.tokenizer,
                                     min(num_windows, data.splits.num_val))
        return cls(build_model(cfg, compute_dtype(precision)), windows)

    def start(self, state: TrainState) -> list[dict[str, Any]]:
        return self.epoch_end(0, state, {})

    def epoch_end(self, epoch: int, state: TrainState, metrics: dict[str, Any]
                  ) -> list[dict[str, Any]]:
        # On one replica: the same rows in every process, and no collective.
        heads, uniform = head_statistics(self.model, local_replica(state.eval_params()),
                                         self.windows.ids, self.windows.punct_keys)
        return [{"epoch": epoch, **row} for row in stats_rows(heads, uniform)]


def read_attention_record(folder: RunFolder) -> list[dict[str, Any]]:
    """attention_by_epoch.csv: the statistics as floats, layer and head as written."""
    return folder.read_rows(AttentionRecord.name, AttentionRecord.fields, ("layer", "head"))

