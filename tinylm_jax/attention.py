"""Attention weights: export for one window, and per-head statistics over many.

Shapes: a window's export is (layers, H, L, L), query positions on axis 2, keys on axis 3; rows
sum to 1 over the causal past. The export is one `.npz` that plain numpy reads (no pickles):
  token_ids (L,) int32, tokens (L,) str, attention (layers, H, L, L) float32,
  metadata: a JSON string (run folder, experiment, checkpoint epoch, where the tokens came from).

The statistics put numbers on what the seed reads off its heatmaps, per head, averaged over
windows and over query positions q (keys k <= q):
  mean_distance   sum_k w[q,k] (q - k): how far back the head looks (0: only itself)
  self_mass       w[q,q]
  prev_mass       w[q,q-1], averaged over q >= 1 only
  punct_mass      mass on keys that are punctuation tokens
  entropy         -sum_k w[q,k] ln w[q,k], in nats (0: one key; ln(q+1): uniform)
A uniform causal head, scored on the same windows, is the reference row.

Training records the same statistics on fixed validation windows at initialisation (epoch 0) and
after every epoch, in the run folder's `attention_by_epoch.csv` (`EPOCH_FIELDS`).
"""

from __future__ import annotations

import functools
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from tinylm_jax.config import UserError
from tinylm_jax.data import Splits

STAT_NAMES = ("mean_distance", "self_mass", "prev_mass", "punct_mass", "entropy")
# How tables and figures name the statistics.
STAT_LABELS = {"mean_distance": "Mean distance", "self_mass": "Self mass",
               "prev_mass": "Previous-token mass", "punct_mass": "Punctuation mass",
               "entropy": "Entropy (nats)"}
EPOCHS_FILE = "attention_by_epoch.csv"  # the statistics per epoch, written by training
EPOCH_FIELDS = ("epoch", "layer", "head", *STAT_NAMES)


@dataclass(frozen=True)
class AttentionExport:
    token_ids: np.ndarray  # (L,) int32
    tokens: np.ndarray  # (L,) str
    attention: np.ndarray  # (layers, H, L, L) float32
    metadata: dict[str, Any]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, token_ids=self.token_ids, tokens=self.tokens.astype(str),
                     attention=self.attention, metadata=np.array(json.dumps(self.metadata)))


def load_attention(path: Path) -> AttentionExport:
    """Read an export; a file that is not one is a UserError saying what is wrong."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: not an attention export (a single array, not .npz)")
        with loaded as f:
            missing = {"token_ids", "tokens", "attention", "metadata"} - set(f.files)
            if missing:
                raise UserError(f"{path}: not an attention export (missing "
                                f"{', '.join(sorted(missing))})")
            export = AttentionExport(f["token_ids"], f["tokens"], f["attention"],
                                     json.loads(str(f["metadata"])))
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: cannot read attention export ({err})") from None
    length = len(export.token_ids)
    if export.attention.ndim != 4 or export.attention.shape[2:] != (length, length):
        raise UserError(f"{path}: attention has shape {export.attention.shape}, expected "
                        f"(layers, heads, {length}, {length})")
    if export.tokens.shape != (length,) or not isinstance(export.metadata, dict):
        raise UserError(f"{path}: tokens or metadata do not match the attention")
    return export


def export_attention(model: nn.Module, params: Any, token_ids: np.ndarray, tokens: list[str],
                     metadata: dict[str, Any]) -> AttentionExport:
    """The attention of every layer and head over one sequence of `token_ids` (L,)."""
    weights = attention_weights(model, params, jnp.asarray(token_ids, jnp.int32)[None])
    return AttentionExport(np.asarray(token_ids, np.int32), np.asarray(tokens, dtype=str),
                           np.asarray(weights[:, 0]), metadata)  # (layers, H, L, L)


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
    offsets = np.linspace(0, num_val - 1, num_windows).round().astype(np.int64)  # distinct
    return splits.num_train + offsets


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
        ids = np.asarray(tokens)[starts[:, None] + np.arange(splits.seq_len)]
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
    for begin in range(0, len(windows), batch_size):
        ids = windows[begin:begin + batch_size]
        marks = punct_keys[begin:begin + batch_size]
        pad = batch_size - len(ids)  # one compiled shape: the last batch is padded, then cut
        stats, uniform = _batch_statistics(model, params, np.pad(ids, ((0, pad), (0, 0))),
                                           np.pad(marks, ((0, pad), (0, 0))))
        keep = batch_size - pad
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


def epoch_rows(model: nn.Module, params: Any, windows: StatWindows, epoch: int
               ) -> list[dict[str, Any]]:
    """The `stats_rows` of `params` on `windows`, each tagged with `epoch` (0: initialisation)."""
    heads, uniform = head_statistics(model, params, windows.ids, windows.punct_keys)
    return [{"epoch": epoch, **row} for row in stats_rows(heads, uniform)]


def stats_markdown(rows: list[dict[str, Any]], num_windows: int, source: str) -> str:
    """The table of `stats_rows`, with what its columns mean."""
    header = f"| Layer | Head | {' | '.join(STAT_LABELS[name] for name in STAT_NAMES)} |"
    lines = ["# Attention statistics per head", "",
             f"Averaged over {num_windows:,} validation windows ({source}) and all query "
             "positions (all but the first for the previous-token mass). Distance counts tokens "
             "back from the query; the masses are shares of each query's attention (punctuation: "
             "tokens made only of punctuation marks); entropy is in nats; the `uniform` row is "
             "a head that spreads attention evenly over the causal past, scored on the same "
             "windows. Per-layer means compare layers.",
             "", header, "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [f"{row[name]:.3f}" for name in STAT_NAMES]
        lines.append(f"| {row['layer']} | {row['head']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"
