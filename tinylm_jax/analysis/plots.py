"""The reference report's figures as PNG files: token frequencies, curves, attention heatmaps.

Every function draws one figure, writes it to `path` and closes it; none shows a window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from tinylm_jax.analysis.attention import STAT_LABELS  # noqa: E402
from tinylm_jax.analysis.attention_stats import STAT_NAMES  # noqa: E402
from tinylm_jax.analysis.budget import BUDGET_LABELS, BUDGETS, BudgetCurve  # noqa: E402
from tinylm_jax.analysis.spread import ExperimentSpread  # noqa: E402
from tinylm_jax.analysis.time_to_quality import QualitySet  # noqa: E402
from tinylm_jax.core.metrics import best_epoch  # noqa: E402
from tinylm_jax.reference.table1 import REFERENCE_VAL_PPL  # noqa: E402

DPI = 120
# One series of a log-log plot: context lengths, costs, and the fitted (exponent, coefficient).
ScalingSeries = tuple[Sequence[float], Sequence[float], tuple[float, float]]


def token_label(token: str) -> str:
    """A token as a tick label: `$` would start matplotlib's math mode, newlines would wrap."""
    return token.replace("$", r"\$").replace("\n", "\\n")


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def token_frequencies(top_tokens: list[tuple[str, int]], path: Path) -> Path:
    """Reference figure 1: the commonest BPE tokens and their counts."""
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    labels = [token_label(tok) for tok, _ in top_tokens]
    ax.bar(range(len(top_tokens)), [n for _, n in top_tokens])
    ax.set_xticks(range(len(top_tokens)), labels, fontsize=11)
    ax.set_xlabel("Token")
    ax.set_ylabel("Frequency in the corpus")
    ax.set_title(f"{len(top_tokens)} most common BPE tokens")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _label_epoch_axes(ax: plt.Axes, epochs: list[int], ylabel: str, title: str) -> None:
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(epochs)
    ax.legend()
    ax.grid(True, alpha=0.3)


def loss_curves(history: list[dict[str, float]], name: str, path: Path) -> Path:
    """Reference figure 3: train and validation cross-entropy per epoch."""
    epochs = [row["epoch"] for row in history]
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="Train loss")
    ax.plot(epochs, [row["val_loss"] for row in history], marker="o", label="Validation loss")
    _label_epoch_axes(ax, epochs, "Cross-entropy loss (nats per token)", f"Loss per epoch\n{name}")
    return _save(fig, path)


def val_perplexity(history: list[dict[str, float]], name: str, path: Path) -> Path:
    """Reference figure 4: validation perplexity per epoch, the best epoch marked."""
    epochs = [row["epoch"] for row in history]
    ppl = [row["val_ppl"] for row in history]
    best = epochs.index(best_epoch(history))
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    ax.plot(epochs, ppl, marker="o", label="Validation perplexity")
    ax.scatter([epochs[best]], [ppl[best]], s=120, facecolors="none", edgecolors="red",
               label=f"Best: {ppl[best]:.2f} (epoch {epochs[best]})", zorder=3)
    _label_epoch_axes(ax, epochs, "Perplexity", f"Validation perplexity per epoch\n{name}")
    return _save(fig, path)


def _perplexity_axis(ax: plt.Axes) -> None:
    ax.set_yscale("log")
    # Plain numbers: perplexities span well under a decade, where "6x10^1" labels are unreadable.
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.grid(True, which="both", alpha=0.3)


def _reference_line(ax: plt.Axes, ours: plt.Line2D, x: Sequence[float], ppl: Sequence[float],
               label: str) -> None:
    """The reference's curve beside one of ours: dashed, in our curve's colour."""
    ax.plot(x, ppl, linestyle="--", marker="x", color=ours.get_color(), alpha=0.85, label=label)


def perplexity_comparison(histories: dict[str, list[dict[str, float]]], path: Path,
                          reference_curves: dict[str, Sequence[float]] | None = None) -> Path:
    """Reference figure 2: validation perplexity of several runs on one log-scale axis, and the
    reference's per-epoch curve dashed beside each run of `histories` that `reference_curves`
    names."""
    reference_curves = reference_curves or {}
    fig, ax = plt.subplots(figsize=(10, 6), layout="constrained")
    for name, history in histories.items():
        ours, = ax.plot([row["epoch"] for row in history], [row["val_ppl"] for row in history],
                        marker="o", alpha=0.85, label=name)
        if name in reference_curves:
            ref = reference_curves[name]
            _reference_line(ax, ours, range(1, len(ref) + 1), ref, f"{name}, reference report")
    _perplexity_axis(ax)
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Validation perplexity (log scale)")
    ax.set_title("Validation perplexity per experiment")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    return _save(fig, path)


def spread_bands(sets: list[ExperimentSpread], path: Path) -> Path:
    """Run-to-run spread, one panel per experiment: every run's validation perplexity thin; over
    the epochs every run reached, the band between the lowest and the highest shaded and their
    mean bold; the reference dashed."""
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 5), squeeze=False,
                             layout="constrained")
    for group, ax in zip(sets, axes[0], strict=True):
        band = group.common_band()
        epochs = [epoch for epoch, _ in band]
        several = len(group.runs) > 1
        if several:
            ax.fill_between(epochs, [b.low for _, b in band], [b.high for _, b in band],
                            alpha=0.2, label="min-max over the runs")
            for run in group.runs:
                ax.plot([row["epoch"] for row in run.history],
                        [row["val_ppl"] for row in run.history], linewidth=0.8, alpha=0.8,
                        color="grey")
        mean, = ax.plot(epochs, [b.mean for _, b in band], linewidth=2.2,
                        label=f"mean of {len(group.runs)} runs" if several
                        else "the one run so far")
        curve = REFERENCE_VAL_PPL.get(group.reference) if group.reference else None
        if curve:
            _reference_line(ax, mean, range(1, len(curve) + 1), curve, "reference report")
        _perplexity_axis(ax)
        ax.set_xlabel("Epoch")
        ax.set_title(group.label, fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
    axes[0][0].set_ylabel("Validation perplexity (log scale)")
    return _save(fig, path)


def time_to_quality_curves(sets: list[QualitySet], thresholds: Sequence[float], path: Path,
                           command: str = "") -> Path:
    """Issue 40's time to quality: validation perplexity against optimiser steps, per set its
    mean bold and min-max band over the evaluations every run reached, each run thin (so a run
    that went on past the others still shows where it crossed), the thresholds dashed; the
    `command` that made it at the foot, so that the image alone says how to redo it."""
    fig, ax = plt.subplots(figsize=(10, 6), layout="constrained")
    for group in sets:
        band = group.band()
        steps = [row[0] for row in band]
        mean, = ax.plot(steps, [row[1] for row in band], linewidth=2.2,
                        label=f"{group.name}: mean of {len(group.runs)} runs"
                        if len(group.runs) > 1 else f"{group.name}: the one run")
        if len(group.runs) > 1:
            ax.fill_between(steps, [row[2] for row in band], [row[3] for row in band],
                            color=mean.get_color(), alpha=0.2)
        for run in group.runs:
            ax.plot(run.steps, run.ppl, linewidth=0.7, alpha=0.6, color=mean.get_color())
    for threshold in thresholds:
        ax.axhline(threshold, linestyle="--", color="black", linewidth=0.9, alpha=0.7)
        ax.annotate(f"{threshold:.2f}", (1.0, threshold), xycoords=("axes fraction", "data"),
                    xytext=(-4, 2), textcoords="offset points", ha="right", fontsize=8)
    _perplexity_axis(ax)
    ax.set_xlabel("Optimiser steps")
    ax.set_ylabel("Validation perplexity (log scale)")
    ax.set_title("Time to quality: validation perplexity against optimiser steps\n"
                 "(band: min-max over the seeds; thin: each run; dashed: thresholds)")
    ax.xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
    ax.legend()
    if command:
        fig.supxlabel(command, fontsize=7, color="grey")
    return _save(fig, path)


def budget_curves(curves: list[BudgetCurve], references: dict[str, BudgetCurve], path: Path
                  ) -> Path:
    """Reference section 5.2: validation perplexity against training time, tokens seen and FLOPs;
    the reference's curve (`references`, keyed by the label of the run it belongs to) dashed
    where it has that budget. The hardware is in the title, or beside each run where they differ."""
    places = {curve.hardware for curve in curves}
    fig, axes = plt.subplots(1, len(BUDGETS), figsize=(5.2 * len(BUDGETS), 5.2), sharey=True,
                             layout="constrained")
    for budget, ax in zip(BUDGETS, axes, strict=True):
        for curve in curves:
            label = curve.label if len(places) == 1 else f"{curve.label} ({curve.hardware})"
            ours, = ax.plot(curve.spent[budget], curve.ppl, marker="o", alpha=0.85, label=label)
            ref = references.get(curve.label)
            if ref is not None and budget in ref.spent:
                _reference_line(ax, ours, ref.spent[budget], ref.ppl, ref.label)
        _perplexity_axis(ax)
        ax.set_xlabel(BUDGET_LABELS[budget])
    axes[0].set_ylabel("Validation perplexity (log scale)")
    handles, labels = axes[-1].get_legend_handles_labels()  # the FLOP panel has the reference's too
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4))
    timed_on = (f"time on {places.pop()}" if len(places) == 1
                else "time on each run's own hardware")
    fig.suptitle(f"Validation perplexity against the training budget ({timed_on})")
    return _save(fig, path)


def _epoch_series(rows: list[dict[str, Any]], layer: str, head: str, stat: str
                  ) -> tuple[list[int], list[float]]:
    own = [row for row in rows if row["layer"] == layer and row["head"] == head]
    return [row["epoch"] for row in own], [row[stat] for row in own]


def _attention_epoch_panel(ax: plt.Axes, rows: list[dict[str, Any]], layer: str, stat: str
                           ) -> None:
    """One layer's `stat` per epoch: every head thin, their mean bold, the uniform head dashed."""
    for head in dict.fromkeys(row["head"] for row in rows if row["layer"] == layer):
        mean = head == "mean"
        ax.plot(*_epoch_series(rows, layer, head, stat), color="black" if mean else None,
                linewidth=2.2 if mean else 0.9, alpha=1.0 if mean else 0.6,
                marker="o" if mean else None, markersize=3,
                label="layer mean" if mean else f"head {head}")
    ax.plot(*_epoch_series(rows, "uniform", "-", stat), color="grey", linestyle="--",
            label="uniform causal head")
    ax.set_title(f"Layer {layer}: {STAT_LABELS[stat]}", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)


def attention_by_epoch(rows: list[dict[str, Any]], name: str, path: Path) -> Path:
    """Reference section 5.3: per layer, the attention statistics of attention_by_epoch.csv's `rows`
    against the epoch."""
    layers = list(dict.fromkeys(row["layer"] for row in rows if row["layer"] != "uniform"))
    fig, axes = plt.subplots(len(layers), len(STAT_NAMES), squeeze=False, sharex=True,
                             figsize=(3.3 * len(STAT_NAMES), 2.8 * len(layers) + 1.0),
                             layout="constrained")
    for (layer, stat), ax in np.ndenumerate(axes):
        _attention_epoch_panel(ax, rows, layers[layer], STAT_NAMES[stat])
    for ax in axes[-1]:
        ax.set_xlabel("Epoch (0: initialisation)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
    fig.suptitle(f"Attention statistics per epoch\n{name}")
    return _save(fig, path)


def head_similarity(distances: np.ndarray, title: str, path: Path) -> Path:
    """Reference section 5.1: per layer, the (H, H) distances between every two heads' attention,
    each cell labelled with its value, on one colour scale from 0."""
    layers, heads = distances.shape[:2]
    fig, axes = plt.subplots(1, layers, figsize=(3.4 * layers + 1.4, 3.9), squeeze=False,
                             layout="constrained")
    vmax = max(float(distances.max()), 1e-6)  # all zeros (identical heads) still draws
    for layer, ax in enumerate(axes[0]):
        image = ax.imshow(distances[layer], cmap="viridis", vmin=0.0, vmax=vmax)
        for (row, col), value in np.ndenumerate(distances[layer]):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value < vmax / 2 else "black")  # legible on viridis
        ax.set_xticks(range(heads))
        ax.set_yticks(range(heads))
        ax.set_xlabel("Head")
        ax.set_ylabel("Head")
        ax.set_title(f"Layer {layer}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.85, label="Jensen-Shannon distance")
    fig.suptitle(title)
    return _save(fig, path)


def scaling_loglog(panels: dict[str, dict[str, ScalingSeries]], title: str, path: Path) -> Path:
    """Reference section 5.5: costs against the context length on log-log axes, one panel per
    y label in `panels`, each series measured (markers) and its fitted power law (dotted)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.4), squeeze=False,
                             layout="constrained")
    for (ylabel, series), ax in zip(panels.items(), axes[0], strict=True):
        for label, (lengths, costs, (exponent, coefficient)) in series.items():
            measured, = ax.plot(lengths, costs, marker="o", linestyle="none",
                                label=f"{label}: slope {exponent:.2f}")
            fitted = np.geomspace(min(lengths), max(lengths), 50)
            ax.plot(fitted, coefficient * fitted ** exponent, linestyle=":",
                    color=measured.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("Context length L (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def attention_head(weights: np.ndarray, tokens: list[str], title: str, path: Path) -> Path:
    """Reference figures 5-8: one head's (L, L) weights, queries down, keys across, tokens on
    both."""
    length = len(tokens)
    size = max(6.0, 0.16 * length + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), layout="constrained")
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, interpolation="nearest")
    labels = [token_label(tok) for tok in tokens]
    fontsize = 9 if length <= 32 else 7
    ax.set_xticks(range(length), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(length), labels, fontsize=fontsize)
    ax.set_xlabel("Key (attended-to token)")
    ax.set_ylabel("Query (attending token)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="Attention weight")
    return _save(fig, path)


def attention_grid(attention: np.ndarray, title: str, path: Path) -> Path:
    """Every head of every layer of one (layers, H, L, L) export, on a shared colour scale."""
    layers, heads = attention.shape[:2]
    fig, axes = plt.subplots(layers, heads, figsize=(2.6 * heads + 1.5, 2.6 * layers + 1.0),
                             squeeze=False, layout="constrained")
    vmax = float(attention.max())
    for (layer, head), ax in np.ndenumerate(axes):
        image = ax.imshow(attention[layer, head], cmap="viridis", vmin=0.0, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(f"layer {layer}, head {head}", fontsize=10)
        ticks = range(0, attention.shape[-1], 16)
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)
        if head == 0:
            ax.set_ylabel("Query position")
        if layer == layers - 1:
            ax.set_xlabel("Key position")
    fig.colorbar(image, ax=axes, shrink=0.8, label="Attention weight")
    fig.suptitle(title)
    return _save(fig, path)


def describe_source(metadata: dict[str, Any]) -> str:
    """A short figure subtitle: which run, checkpoint and text an export came from."""
    return (f"{metadata.get('experiment', '?')}, {metadata.get('position', 'epoch ?')}"
            f" ({metadata.get('checkpoint', '?')}); {metadata.get('source', '')}")
