"""Attention for people to read: one window's export, tables of the per-head statistics
(`attention_stats`), and how alike the heads of a layer are.

Shapes: a window's export is (layers, H, L, L), query positions on axis 2, keys on axis 3; rows
sum to 1 over the causal past. The export is one `.npz` that plain numpy reads (no pickles):
  token_ids (L,) int32, tokens (L,) str, attention (layers, H, L, L) float32,
  metadata: a JSON string (run folder, experiment, checkpoint epoch, where the tokens came from).

Head similarity ("redundancy with variation"): per layer, the Jensen-Shannon distance between
two heads' attention rows over the causal keys, averaged over query positions and windows, with
each head's distance to the uniform causal head as the reference (`head_similarity`).
"""

from __future__ import annotations

import functools
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tinylm_jax.analysis.attention_stats import STAT_NAMES, attention_weights, uniform_causal
from tinylm_jax.core.config import UserError
from tinylm_jax.core.data import padded_batches

# How tables and figures name the statistics.
STAT_LABELS = {"mean_distance": "Mean distance", "self_mass": "Self mass",
               "prev_mass": "Previous-token mass", "punct_mass": "Punctuation mass",
               "entropy": "Entropy (nats)"}


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
    for keep, (ids,) in padded_batches((windows,), batch_size):
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
