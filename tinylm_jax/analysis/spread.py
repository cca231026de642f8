"""Run-to-run spread: how far apart runs of one protocol land when only the random seed differs.

Per experiment, over its finished runs: the best validation perplexity's mean, standard
deviation (n - 1), range and a 95% bootstrap interval of the mean; the range of best epochs;
the per-epoch band (min, mean, max over the runs that reached the epoch); and where the
reference's numbers fall in that spread. With 3-10 runs a percentile bootstrap of the mean is
what rliable (Agarwal et al. 2021) recommends for so few; it is no wider than the runs' range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.metrics import latest_is_best
from tinylm_jax.reference.table1 import REFERENCE_TABLE1, REFERENCE_VAL_PPL, reference_experiment
from tinylm_jax.run.folder import RunFolder, seed_members

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # the interval is reproducible, figure for figure


@dataclass(frozen=True)
class Spread:
    """Summary statistics of n values."""

    n: int
    mean: float
    std: float  # sample standard deviation (n - 1); nan for one value
    low: float  # the smallest value
    high: float  # the largest value
    ci_low: float  # 95% percentile-bootstrap interval of the mean
    ci_high: float

    def mean_and_sd(self, digits: int = 2) -> str:
        """The mean ± sd as the report and Table 1 print it: one value has no sd to print."""
        mean = f"{self.mean:.{digits}f}"
        return mean if self.n < 2 else f"{mean} ± {self.std:.{digits}f}"

    def range_text(self) -> str:
        """min-max; one value has no range, and a "58.54-58.54" would read as if it had one."""
        return "-" if self.n < 2 else f"{self.low:.2f}-{self.high:.2f}"

    def interval_text(self) -> str:
        """The bootstrap interval; one value has none, as it has no range."""
        return "-" if self.n < 2 else f"{self.ci_low:.2f}-{self.ci_high:.2f}"


def spread(values: list[float], resamples: int = BOOTSTRAP_RESAMPLES,
           seed: int = BOOTSTRAP_SEED) -> Spread:
    """The spread of `values`; the bootstrap resamples them with replacement `resamples` times."""
    array = np.asarray(values, np.float64)
    if not len(array):
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), (resamples, len(array)))].mean(axis=1)
    ci_low, ci_high = np.percentile(means, [2.5, 97.5])
    return Spread(len(array), float(array.mean()),
                  float(array.std(ddof=1)) if len(array) > 1 else math.nan,
                  float(array.min()), float(array.max()), float(ci_low), float(ci_high))


@dataclass(frozen=True)
class SeedRun:
    """One finished run of a set."""

    folder: Path
    seed: int
    history: list[dict[str, float]]
    summary: dict[str, Any]

    @property
    def device(self) -> str:
        """Where it ran: summary.json's `cpu` (the chip, where this version recorded it), else its
        `device_kind` (on a CPU, jax says only "cpu")."""
        return str(self.summary.get("cpu") or self.summary.get("device_kind", "unknown"))


@dataclass(frozen=True)
class ExperimentSpread:
    """Every finished run of one protocol, and their spread."""

    label: str  # the experiment's name, with its precision and any step limit
    experiment: str  # the config's name
    runs: list[SeedRun]
    config: ExperimentConfig  # the runs' config, seed 0
    setup: tuple[Any, ...] = ()  # what else the protocol is: precision, step limit, corpus

    @property
    def best(self) -> Spread:
        return spread([run.summary["best_val_ppl"] for run in self.runs])

    @property
    def last(self) -> Spread:
        """The last epoch's validation perplexity, which selects nothing."""
        return spread([run.history[-1]["val_ppl"] for run in self.runs])

    def nats(self, chars_per_token: float) -> tuple[Spread, Spread, Spread]:
        """Best nats per token, best and last-epoch nats per character, for validation targets
        of `chars_per_token` characters on average."""
        best = [run.summary["best_val_loss"] for run in self.runs]
        return (spread(best), spread([loss / chars_per_token for loss in best]),
                spread([run.history[-1]["val_loss"] / chars_per_token for run in self.runs]))

    @property
    def best_epochs(self) -> list[int]:
        return [run.summary["best_epoch"] for run in self.runs]

    @property
    def still_improving(self) -> list[bool]:
        """Per run: its last epoch was still a new best, so the epoch cap ended it, not early
        stopping, and its best epoch is only a lower bound of where a longer cap would put it."""
        return [latest_is_best(run.history) for run in self.runs]

    def band(self) -> list[tuple[int, Spread]]:
        """Per epoch, the spread of validation perplexity over the runs that reached it."""
        longest = max(len(run.history) for run in self.runs)
        return [(epoch, spread([run.history[epoch - 1]["val_ppl"] for run in self.runs
                                if len(run.history) >= epoch]))
                for epoch in range(1, longest + 1)]

    def common_band(self) -> list[tuple[int, Spread]]:
        """The band over the epochs every run reached: past the first early stop a mean would
        change which runs it averages, and so jump with no run doing so."""
        return self.band()[:min(len(run.history) for run in self.runs)]

    @property
    def reference(self) -> str | None:
        """The reference experiment these runs reproduce, if any."""
        return reference_experiment(self.experiment, self.experiment)


def read_sets(paths: list[Path]) -> list[ExperimentSpread]:
    """The finished runs under `paths` (sets of `seed-N` run folders, or run folders), grouped
    by protocol in the order first met: the same config but for the seed, the same precision,
    step limit and corpus. A run that has not finished is left out."""
    groups: dict[str, ExperimentSpread] = {}  # by protocol
    for path in paths:
        for member in [member for _, member in seed_members(path)] or [path]:
            folder = RunFolder(member)
            if not folder.has_summary():
                continue
            cfg, record = folder.read_record()
            setup = (record.get("compute_dtype"), record.get("max_steps_per_epoch"),
                     record.get("corpus_sha256"))
            protocol = json.dumps([cfg.replace(seed=0).to_dict(), *setup], sort_keys=True)
            group = groups.setdefault(protocol, ExperimentSpread(
                _label(cfg.name, record), cfg.name, [], cfg.replace(seed=0), setup))
            group.runs.append(SeedRun(member, cfg.seed, folder.read_history(),
                                      folder.read_summary()))
    if not groups:
        raise UserError(f"no finished run under {', '.join(map(str, paths))}")
    for group in groups.values():
        seeds = [run.seed for run in group.runs]
        twice = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if twice:
            raise UserError(f"{group.label}: seed {twice[0]} appears in more than one run "
                            "folder; a spread counts each seed once")
    labels = [group.label for group in groups.values()]
    if len(set(labels)) < len(labels):
        raise UserError(f"runs of one experiment under different protocols ({', '.join(labels)})"
                        ": give each set its own spread")
    return list(groups.values())


def _label(name: str, record: dict[str, Any]) -> str:
    """The experiment's name, with what sets its protocol apart from the reference's."""
    extra = [record["compute_dtype"]] if record.get("compute_dtype") else []
    if record.get("max_steps_per_epoch"):
        extra.append(f"{record['max_steps_per_epoch']} steps per epoch")
    return f"{name} ({', '.join(extra)})" if extra else name


def _marked(epochs: list[int], still_improving: list[bool] | None) -> list[str]:
    """Each best epoch, with a "+" where the run was still improving when the cap ended it."""
    flags = [False] * len(epochs) if still_improving is None else still_improving
    return [f"{epoch}+" if flag else str(epoch) for epoch, flag in zip(epochs, flags, strict=True)]


def best_epochs_text(epochs: list[int], still_improving: list[bool] | None = None) -> str:
    """The runs' best epochs: their range, then each run's in run order; one run's alone. Runs
    of one protocol share its epoch cap, so only the range's top can carry a "+"."""
    marked = _marked(epochs, still_improving)
    low, top = min(epochs), max(epochs)
    high = f"{top}+" if f"{top}+" in marked else str(top)
    span = high if low == top else f"{low}-{high}"
    return span if len(epochs) < 2 else f"{span} ({', '.join(marked)})"


def best_epochs_sentence(epochs: list[int], still_improving: list[bool] | None = None) -> str:
    """The runs' best epochs as a clause of prose, in run order; one run's in the singular."""
    marked = _marked(epochs, still_improving)
    clause = (f"the one run's best epoch is {marked[0]}" if len(epochs) == 1
              else f"the runs' best epochs are {', '.join(marked)}")
    if "+" in "".join(marked):
        clause += (" (a + marks a run whose last epoch was still a new best: the epoch cap "
                   "ended it, so its best epoch is a lower bound)")
    return clause


def where_it_falls(value: float, values: Spread) -> str:
    """Where a reference number falls against runs' spread: inside the runs' range or not, and
    how many standard deviations from their mean. One run (a set of one, or the only run that
    reached an epoch) has no spread to place it in: only how far it lies from that run."""
    if values.n < 2:
        return f"{(value - values.mean) / values.mean:+.1%} from the one run"
    inside = "inside" if values.low <= value <= values.high else "outside"
    if not values.std:
        return f"{inside} the range"
    return f"{inside} the range, {(value - values.mean) / values.std:+.1f} sd from the mean"


def spread_markdown(sets: list[ExperimentSpread], figure_name: str, command: str,
                    chars_per_token: dict[str, float] | None = None) -> str:
    """The spread report; with `chars_per_token` (per set's label: the validation targets' mean
    characters), its figures in nats per token and per character too."""
    lines = ["# Run-to-run spread", "",
             f"Runs of one protocol that differ only in the random seed (initialisation and data "
             f"order). Reproduce: `{command}`. Best PPL: each run's best validation perplexity; "
             "sd with n - 1; the interval is a 95% percentile bootstrap of the mean "
             f"({BOOTSTRAP_RESAMPLES:,} resamples); with three runs or fewer it is the range "
             "itself (a resample made only of the lowest value, or only of the highest, has a "
             "chance of at least 1/27), so there the range is the figure to read. Last PPL: "
             "each run's last epoch's, which selects nothing.", "",
             "| Experiment | Runs (seeds) | Best PPL mean ± sd | Min-max | 95% CI of the mean | "
             "Best epochs | Last PPL mean ± sd | Reference best (epoch) | Reference against the "
             "runs |", "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for group in sets:
        best = group.best
        seeds = ", ".join(str(run.seed) for run in group.runs)
        reference = REFERENCE_TABLE1.get(group.reference) if group.reference else None
        ref_text = f"{reference[0]:.2f} ({reference[1]})" if reference else "-"
        falls = where_it_falls(reference[0], best) if reference else "-"
        lines.append(f"| {group.label} | {best.n} ({seeds}) | {best.mean_and_sd()} | "
                     f"{best.range_text()} | {best.interval_text()} | "
                     f"{best_epochs_text(group.best_epochs, group.still_improving)} | "
                     f"{group.last.mean_and_sd()} | {ref_text} | {falls} |")
    if chars_per_token:
        lines += nats_markdown(sets, chars_per_token)
    for group in sets:
        curve = REFERENCE_VAL_PPL.get(group.reference, ()) if group.reference else ()
        lines += ["", f"## {group.label}, epoch by epoch", "",
                  "| Epoch | Runs | Val PPL min | Mean | Max | Reference | Reference against the "
                  "runs |", "|---:|---:|---:|---:|---:|---:|---|"]
        for epoch, band in group.band():
            ref = curve[epoch - 1] if epoch <= len(curve) else None
            lines.append(f"| {epoch} | {band.n} | {band.low:.2f} | {band.mean:.2f} | "
                         f"{band.high:.2f} | {'-' if ref is None else f'{ref:.2f}'} | "
                         f"{'-' if ref is None else where_it_falls(ref, band)} |")
        if group.reference:
            lines += ["", f"The reference's best epoch is {REFERENCE_TABLE1[group.reference][1]}"
                      f"; {best_epochs_sentence(group.best_epochs, group.still_improving)}."]
    lines += ["", f"![Per-epoch band]({figure_name})", ""]
    return "\n".join(lines)


def nats_markdown(sets: list[ExperimentSpread], chars_per_token: dict[str, float]) -> list[str]:
    """The spread in nats: per token (ln PPL), and per character of the validation targets'
    own text, which does not depend on the tokenizer."""
    lines = ["", "## In nats", "",
             "Nats per character: each run's validation loss (nats per target token) over the "
             "mean characters of a validation target, counted from the validation windows' own "
             "text (`tinylm evaluate` counts them the same way).", "",
             "| Experiment | Characters per target | Best nats/token mean ± sd | "
             "Best nats/char mean ± sd | Min-max | Last-epoch nats/char mean ± sd |",
             "|---|---:|---:|---:|---:|---:|"]
    for group in sets:
        ratio = chars_per_token[group.label]
        per_token, per_char, last = group.nats(ratio)
        lines.append(f"| {group.label} | {ratio:.4f} | {per_token.mean_and_sd(4)} | "
                     f"{per_char.mean_and_sd(4)} | "
                     f"{'-' if per_char.n < 2 else f'{per_char.low:.4f}-{per_char.high:.4f}'} | "
                     f"{last.mean_and_sd(4)} |")
    return lines


def sweep_markdown(sets: list[ExperimentSpread], figure_name: str, command: str) -> str:
    """A sweep's table: one row per setting (its set of seeds), with the spread's figures; the
    setting of the lowest mean best PPL is marked."""
    best = min(range(len(sets)), key=lambda index: sets[index].best.mean)
    lines = ["# Sweep", "",
             f"One row per setting, over its seeds. Reproduce: `{command}`. Best PPL: each run's "
             "best validation perplexity; last PPL: its last epoch's, which selects nothing; sd "
             "with n - 1. The setting of the lowest mean best PPL is in bold.", "",
             "| Setting | Runs (seeds) | Best PPL mean ± sd | Min-max | Best epochs | "
             "Last PPL mean |", "|---|---|---:|---:|---|---:|"]
    for index, group in enumerate(sets):
        spread_ = group.best
        seeds = ", ".join(str(run.seed) for run in group.runs)
        last = group.last
        mark = "**" if index == best else ""
        lines.append(f"| {mark}{group.label}{mark} | {spread_.n} ({seeds}) | "
                     f"{mark}{spread_.mean_and_sd()}{mark} | {spread_.range_text()} | "
                     f"{best_epochs_text(group.best_epochs, group.still_improving)} | "
                     f"{last.mean:.2f} |")
    lines += ["", f"![Validation perplexity per setting]({figure_name})", ""]
    return "\n".join(lines)
