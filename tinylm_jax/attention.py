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

Head similarity ("redundancy with variation"): per layer, the Jensen-Shannon distance between
two heads' attention rows over the causal keys, averaged over query positions and windows, with
each head's distance to the uniform causal head as the reference (`head_similarity`).

Training records the same statistics on fixed validation windows at initialisation (epoch 0) and
after every epoch, in the run folder's `attention_by_epoch.csv` (`EPOCH_FIELDS`).
"""

from __future__ import annotations

import functools
import json
import math
import zipfile
from collections.abc import Iterator
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


def _padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int
                    ) -> Iterator[tuple[int, list[np.ndarray]]]:
    """The rows of `arrays` (each (N, ...)) in batches of `batch_size` rows, the last padded with
    zeros so that one compiled shape serves them all, each with its count of real rows."""
    for begin in range(0, len(arrays[0]), batch_size):
        parts = [array[begin:begin + batch_size] for array in arrays]
        keep = len(parts[0])
        yield keep, [np.pad(part, ((0, batch_size - keep),) + ((0, 0),) * (part.ndim - 1))
                     for part in parts]


def head_statistics(model: nn.Module, params: Any, windows: np.ndarray, punct_keys: np.ndarray,
                    batch_size: int = 64) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Statistics averaged over `windows` (N, L) token ids: per head, each (layers, H), and for
    the uniform causal reference, one float each. `punct_keys` (N, L) marks punctuation."""
    parts, reference = [], []
    for keep, (ids, marks) in _padded_batches((windows, punct_keys), batch_size):
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


# --- Head similarity ------------------------------------------------------------------------

JS_DISTANCE_MAX = math.sqrt(math.log(2.0))  # two distributions with disjoint supports


def js_distance(p: jax.Array, q: jax.Array) -> jax.Array:
    """Jensen-Shannon distance between the distributions on the last axis (broadcast): the
    square root of the divergence in nats, 0 for equal rows and at most `JS_DISTANCE_MAX`."""
    mean = (p + q) / 2

    def divergence(a: jax.Array) -> jax.Array:  # KL(a || mean); mean > 0 wherever a > 0
        support = a > 0
        ratio = jnp.where(support, a, 1.0) / jnp.where(support, mean, 1.0)  # 1 off: 0 ln 0 = 0
        return jnp.sum(a * jnp.log(ratio), axis=-1)

    # Rounding can leave a divergence a hair below 0, where the square root is NaN.
    return jnp.sqrt(jnp.maximum((divergence(p) + divergence(q)) / 2, 0.0))


@functools.partial(jax.jit, static_argnames="model")
def _batch_similarity(model: nn.Module, params: Any, ids: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """Per window, the mean over query positions of the distance between every two heads,
    (layers, B, H, H), and between each head and the uniform causal head, (layers, B, H)."""
    weights = attention_weights(model, params, ids)  # (layers, B, H, L, L)
    pairs = js_distance(weights[:, :, :, None], weights[:, :, None]).mean(axis=-1)
    uniform = uniform_causal(*ids.shape)[None]  # (1, B, 1, L, L)
    return pairs, js_distance(weights, uniform).mean(axis=-1)


def head_similarity(model: nn.Module, params: Any, windows: np.ndarray, batch_size: int = 64
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Distances averaged over `windows` (N, L) token ids: between every two heads of a layer,
    (layers, H, H) float64, and between each head and the uniform causal head, (layers, H)."""
    pairs, uniform = [], []
    for keep, (ids,) in _padded_batches((windows,), batch_size):
        batch_pairs, batch_uniform = _batch_similarity(model, params, ids)
        pairs.append(np.asarray(batch_pairs)[:, :keep])
        uniform.append(np.asarray(batch_uniform)[:, :keep])
    return (np.concatenate(pairs, axis=1).mean(axis=1, dtype=np.float64),
            np.concatenate(uniform, axis=1).mean(axis=1, dtype=np.float64))


def similarity_rows(distances: np.ndarray, to_uniform: np.ndarray) -> list[dict[str, Any]]:
    """One row per (layer, head): its distance to each head of its layer, and to uniform."""
    layers, heads = to_uniform.shape
    return [{"layer": layer, "head": head,
             **{str(other): float(distances[layer, head, other]) for other in range(heads)},
             "uniform": float(to_uniform[layer, head])}
            for layer in range(layers) for head in range(heads)]


def off_diagonal(matrix: np.ndarray) -> np.ndarray:
    """The entries of a square matrix off its diagonal: the pairs of different heads."""
    return matrix[~np.eye(len(matrix), dtype=bool)]


def similarity_markdown(distances: np.ndarray, to_uniform: np.ndarray, num_windows: int,
                        source: str, figure_name: str) -> str:
    """Per layer, a summary line and the H x H table with the uniform reference column."""
    layers, heads = to_uniform.shape
    lines = ["# Head similarity per layer", "",
             "Jensen-Shannon distance (natural log: 0 for identical attention, at most "
             f"sqrt(ln 2) = {JS_DISTANCE_MAX:.3f} for attention on disjoint keys) between two "
             "heads' attention rows over the causal keys, averaged over every query position "
             "(query 0 sees only itself, so it counts 0 for every pair) and over "
             f"{num_windows:,} validation windows ({source}). `uniform`: each head against a "
             "head that spreads its attention evenly over the causal past, on the same windows: "
             "how far from indifference it is. Small distances between heads beside large ones "
             "to uniform: redundancy; their spread: the variation.", "",
             f"![head similarity]({figure_name})", "",
             "| Layer | Mean between heads | Least | Most | Mean to uniform |",
             "|---|---:|---:|---:|---:|"]
    for layer in range(layers):
        pairs = off_diagonal(distances[layer])
        lines.append(f"| {layer} | {pairs.mean():.3f} | {pairs.min():.3f} | {pairs.max():.3f} | "
                     f"{to_uniform[layer].mean():.3f} |")
    for layer in range(layers):
        lines += ["", f"## Layer {layer}", "",
                  f"| Head | {' | '.join(str(h) for h in range(heads))} | uniform |",
                  "|---|" + "---:|" * (heads + 1)]
        lines += [f"| {head} | {' | '.join(f'{d:.3f}' for d in distances[layer, head])} | "
                  f"{to_uniform[layer, head]:.3f} |" for head in range(heads)]
    return "\n".join(lines) + "\n"
