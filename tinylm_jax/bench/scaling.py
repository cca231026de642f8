"""Reference section 5.5 measured: how the cost of training grows with the context length L.

The reference: "doubling the sequence length asymptotically quadruples the computational and memory
cost of the attention sub-layer", and activation storage dominates memory. For each L this
builds the experiment's model with seq_len = L (no training and no corpus: random tokens and
inputs) and measures, after a warm-up, the median seconds of `repeats` calls of
  step       one whole training step: forward, backward, clipping and AdamW (`train.train_step`)
  attention  the attention sub-layer alone, `model.MultiHeadSelfAttention` on a random (B, L, D)
             input, forward and backward
and the memory of each compiled call from XLA's buffer assignment (`memory_analysis()`):
arguments + outputs - donated + temporaries, the temporaries being what the forward pass keeps
for the backward pass and the scratch. In two settings:
  fixed tokens   B = tokens / L, as under a fixed budget of tokens per step: attention's
                 B L^2 = tokens L, so its exponent tends to 1
  fixed windows  B fixed, as the reference's batches of 512 windows: attention grows as L^2 (2)
An exponent is the least-squares slope of log cost on log L.
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tinylm_jax.analysis import plots
from tinylm_jax.bench.benchmark import machine_description, random_batch
from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.files import write_csv_atomic
from tinylm_jax.core.model import MultiHeadSelfAttention, model_kernels
from tinylm_jax.core.train import (
    compute_dtype,
    compute_dtype_name,
    create_train_state,
    train_step,
)

SETTINGS = ("fixed tokens", "fixed windows")
# The reference's claim, as the exponent each setting's costs tend to once attention dominates.
ASYMPTOTE = {"fixed tokens": 1, "fixed windows": 2}
# Each measured cost, a CSV column: (what, seconds or memory).
COSTS = {"attention_s": ("attention sub-layer", "seconds"),
         "attention_bytes": ("attention sub-layer", "memory"),
         "step_s": ("training step", "seconds"), "step_bytes": ("training step", "memory")}
CSV_FIELDS = ("setting", "seq_len", "batch", "step_s", "attention_s", "attention_share",
              "step_bytes", "step_temp_bytes", "attention_bytes")
DEFAULT_LENGTHS = (32, 64, 128, 256, 512)
MIB = 2**20
Plan = list[tuple[str, ExperimentConfig]]  # (setting, config) pairs, in the order measured


@dataclass(frozen=True)
class Cost:
    """One compiled call: median seconds, and XLA's peak and temporary bytes."""

    seconds: float
    peak_bytes: int
    temp_bytes: int


def fit_power_law(lengths: Sequence[float], costs: Sequence[float]) -> tuple[float, float]:
    """(k, c) of cost = c * L**k, by least squares of log cost on log L."""
    exponent, intercept = np.polyfit(np.log(lengths), np.log(costs), 1)
    return float(exponent), float(np.exp(intercept))


def batch_size(setting: str, seq_len: int, tokens: int, windows: int) -> int:
    """Windows per batch at context `seq_len` in `setting`."""
    if setting == "fixed windows":
        return windows
    if tokens % seq_len:
        raise UserError(f"--tokens ({tokens}) must be a multiple of every length, not of "
                        f"{seq_len}")
    return tokens // seq_len


def plan(base: ExperimentConfig, lengths: Sequence[int], tokens: int, windows: int) -> Plan:
    """Every (setting, config) to measure, all checked before any is measured."""
    return [(setting, base.replace(seq_len=length,
                                   batch_size=batch_size(setting, length, tokens, windows)))
            for setting in SETTINGS for length in lengths]


def _median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up: the first call of a compiled function pays for more than the work
    return statistics.median(timeit.repeat(call, number=1, repeat=repeats))


def _cost(compiled: Any, call: Callable[[], object], repeats: int) -> Cost:
    """Time `call` and read `compiled`'s buffer assignment. peak_memory_in_bytes is not used:
    on CPU (jaxlib 0.10) it leaves the temporaries out."""
    stats = compiled.memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    return Cost(_median_seconds(call, repeats), peak, stats.temp_size_in_bytes)


def step_cost(cfg: ExperimentConfig, precision: str, repeats: int) -> Cost:
    """A whole training step on random tokens, the state donated as in training."""
    state = create_train_state(cfg, precision)
    batch = random_batch(cfg)
    compiled = train_step.lower(state, batch).compile()

    def call() -> None:
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    return _cost(compiled, call, repeats)


def attention_cost(cfg: ExperimentConfig, precision: str, repeats: int) -> Cost:
    """The model's attention sub-layer alone, forward and backward, on a random input."""
    dtype = compute_dtype(precision)
    layer = MultiHeadSelfAttention(cfg, dtype, model_kernels())
    x = jax.random.normal(jax.random.key(0), (cfg.batch_size, cfg.seq_len, cfg.d_model))
    params = layer.init(jax.random.key(1), x[:1, :1])["params"]  # they depend on neither B nor L

    def loss(params: Any, x: jax.Array) -> jax.Array:  # a scalar: the whole backward pass runs
        return jnp.sum(layer.apply({"params": params}, x)[0].astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return _cost(compiled, lambda: jax.block_until_ready(compiled(params, x)), repeats)


def measure(configs: Plan, precision: str, repeats: int,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One CSV row per (setting, config); a shape both settings share is measured once."""
    measured: dict[tuple[int, int], tuple[Cost, Cost]] = {}
    rows = []
    for setting, cfg in configs:
        shape = (cfg.batch_size, cfg.seq_len)
        if shape not in measured:
            log(f"{setting}: L = {cfg.seq_len}, B = {cfg.batch_size}")
            measured[shape] = (step_cost(cfg, precision, repeats),
                               attention_cost(cfg, precision, repeats))
        step, attention = measured[shape]
        rows.append({"setting": setting, "seq_len": cfg.seq_len, "batch": cfg.batch_size,
                     "step_s": step.seconds, "attention_s": attention.seconds,
                     # The step runs the sub-layer once per layer.
                     "attention_share": cfg.n_layers * attention.seconds / step.seconds,
                     "step_bytes": step.peak_bytes, "step_temp_bytes": step.temp_bytes,
                     "attention_bytes": attention.peak_bytes})
    return rows


def exponents(rows: list[dict[str, Any]], last: int | None = None
              ) -> dict[tuple[str, str], tuple[float, float]]:
    """(setting, cost) -> fitted (k, c), over every length or only the `last` longest."""
    fits = {}
    for setting in SETTINGS:
        own = sorted((row for row in rows if row["setting"] == setting),
                     key=lambda row: row["seq_len"])[-(last or len(rows)):]
        for cost in COSTS:
            fits[setting, cost] = fit_power_law([row["seq_len"] for row in own],
                                                [row[cost] for row in own])
    return fits


def scaling_markdown(rows: list[dict[str, Any]], base: ExperimentConfig, precision: str,
                     repeats: int, command: str, figure_name: str) -> str:
    """The fitted exponents beside the reference's asymptotes, then every measurement."""
    fits, near = exponents(rows), exponents(rows, last=2)
    lines = ["# Cost against context length", "",
             f"- Model: {base.name} (d_model {base.d_model}, {base.n_layers} layers, "
             f"{base.n_heads} heads, d_ff {base.d_ff}, vocabulary {base.vocab_size}) with "
             f"seq_len = L; precision {precision} ({compute_dtype_name(precision)} "
             f"compute); random tokens and inputs.",
             f"- Machine: {machine_description()}.",
             f"- Seconds: the median of {repeats} timed call(s) after a warm-up call. "
             "Memory: XLA's buffer "
             "assignment of the compiled call, arguments + outputs - donated + temporaries. "
             "Attention: the model's attention sub-layer alone, forward and backward; its "
             "share of the step counts it once per layer.",
             f"- Reproduce: `{command}`.", "", f"![cost against context length]({figure_name})",
             "", "## Exponents", "",
             "cost = c L^k, k by least squares of log cost on log L over every length, and "
             "over the two longest only (nearer the asymptote). The reference's claim: k tends to "
             "2 for the attention sub-layer at fixed windows, and so to 1 at fixed tokens "
             "(B = tokens / L); the whole step follows once attention dominates it.", "",
             "| Setting | Cost | k, every length | k, two longest | reference's asymptote |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {setting} | {what}, {unit} | {fits[setting, cost][0]:.2f} | "
              f"{near[setting, cost][0]:.2f} | {ASYMPTOTE[setting]} |"
              for setting in SETTINGS for cost, (what, unit) in COSTS.items()]
    for setting in SETTINGS:
        lines += ["", f"## {setting.capitalize()}", "",
                  "| L | B | Step s | Attention s | Attention share of step | Step MiB | "
                  "Activations share of step memory | Attention MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['seq_len']} | {row['batch']} | {row['step_s']:.4f} | "
                  f"{row['attention_s']:.4f} | {row['attention_share']:.0%} | "
                  f"{row['step_bytes'] / MIB:,.1f} | "
                  f"{row['step_temp_bytes'] / row['step_bytes']:.0%} | "
                  f"{row['attention_bytes'] / MIB:,.1f} |"
                  for row in rows if row["setting"] == setting]
    return "\n".join(lines) + "\n"


def _panels(rows: list[dict[str, Any]]) -> dict[str, dict[str, plots.ScalingSeries]]:
    """The figure's series: a seconds panel and a MiB panel, a series per (cost, setting)."""
    panels: dict[str, dict[str, plots.ScalingSeries]] = {"seconds": {}, "memory": {}}
    for (setting, cost), (exponent, coefficient) in exponents(rows).items():
        what, unit = COSTS[cost]
        scale = MIB if unit == "memory" else 1.0
        own = [row for row in rows if row["setting"] == setting]
        panels[unit][f"{what}, {setting}"] = ([row["seq_len"] for row in own],
                                              [row[cost] / scale for row in own],
                                              (exponent, coefficient / scale))
    return {"Seconds per call": panels["seconds"],
            "MiB per call (XLA buffer assignment)": panels["memory"]}


def write_scaling(rows: list[dict[str, Any]], base: ExperimentConfig, precision: str,
                  repeats: int, command: str, out: Path) -> list[Path]:
    """attention_scaling.csv, .md and .png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / "attention_scaling.csv"
    write_csv_atomic(table, CSV_FIELDS, rows)
    figure = plots.scaling_loglog(_panels(rows), f"Cost against context length: {base.name}, "
                                  f"{precision}", out / "attention_scaling.png")
    report = out / "attention_scaling.md"
    report.write_text(scaling_markdown(rows, base, precision, repeats, command, figure.name),
                      encoding="utf-8")
    return [report, table, figure]
