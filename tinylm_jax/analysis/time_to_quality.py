"""Time to quality: optimiser steps and training seconds until validation first reaches a
perplexity, per run and over a set of seeds.

The best perplexity says how good a recipe gets; this says how soon, which is what a faster
recipe has to show (issue 40: the reference's 60.00 and 58.35 in fewer steps). A run "reaches"
a threshold at its first evaluation with validation perplexity <= the threshold, not at its
best. Steps are history.csv's `step` (the optimiser steps taken at that evaluation) where a row
has it; rows of runs from before that column have none, and there a pass over the training
windows, ceil(train_windows / batch_size) steps (`max_steps_per_epoch` caps it), is one epoch.
Seconds are the sum of `epoch_seconds` up to the evaluation: training time only, validation
excluded, on the device the run's summary.json names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tinylm_jax.analysis.spread import SeedRun, read_sets
from tinylm_jax.core.config import UserError
from tinylm_jax.core.files import write_text_atomic
from tinylm_jax.run.folder import RunFolder

# The reference's baseline best and its wider best (Table 1): the two targets.
DEFAULT_THRESHOLDS = (60.00, 58.35)


@dataclass(frozen=True)
class Crossing:
    """Where one run first reached a threshold."""

    epoch: int  # the evaluation's row (an epoch, or eval_every steps with `eval_every`)
    step: int  # optimiser steps taken by then
    seconds: float  # training seconds by then, validation excluded
    ppl: float  # the validation perplexity there


@dataclass(frozen=True)
class RunCurve:
    """One run's validation perplexity against optimiser steps and training seconds."""

    folder: Path
    seed: int
    epochs: list[int]
    steps: list[int]
    seconds: list[float]  # cumulative
    ppl: list[float]
    steps_per_epoch: int  # between evaluations; what a row without `step` counts
    device: str  # SeedRun.device: summary.json's cpu, else its device_kind

    def crossing(self, threshold: float) -> Crossing | None:
        """The first evaluation at or below `threshold`; None if the run never got there."""
        for index, ppl in enumerate(self.ppl):
            if ppl <= threshold:
                return Crossing(self.epochs[index], self.steps[index], self.seconds[index], ppl)
        return None

    @property
    def best(self) -> tuple[float, int]:
        """The lowest perplexity and its epoch (the first, on a tie)."""
        index = min(range(len(self.ppl)), key=lambda i: (self.ppl[i], i))
        return self.ppl[index], self.epochs[index]


@dataclass(frozen=True)
class Aggregate:
    """One threshold over a set: how many runs reached it, and mean/min/max over those."""

    reached: int
    runs: int
    steps: tuple[float, float, float] | None  # mean, min, max; None if no run reached it
    seconds: tuple[float, float, float] | None


@dataclass(frozen=True)
class QualitySet:
    """One set of runs (a folder of seed-N runs, or one run) that differ only in the seed."""

    folder: Path
    label: str  # the experiment's name and protocol, as the spread report names it
    runs: list[RunCurve]
    name: str  # the figure's legend: the reference's short name (baseline...), else the config's

    def aggregate(self, threshold: float) -> Aggregate:
        crossings = [c for run in self.runs if (c := run.crossing(threshold)) is not None]
        if not crossings:
            return Aggregate(0, len(self.runs), None, None)
        return Aggregate(len(crossings), len(self.runs),
                         _mean_min_max([c.step for c in crossings]),
                         _mean_min_max([c.seconds for c in crossings]))

    def band(self) -> list[tuple[int, float, float, float]]:
        """(steps, mean, min, max) of validation perplexity over the evaluations every run
        reached: past the first run's end the mean would jump as runs drop out. Runs of one
        protocol evaluate at the same steps, so the first run's steps stand for all."""
        common = min(len(run.ppl) for run in self.runs)
        rows = []
        for index in range(common):
            values = [run.ppl[index] for run in self.runs]
            rows.append((self.runs[0].steps[index], sum(values) / len(values), min(values),
                         max(values)))
        return rows

    @property
    def devices(self) -> str:
        return ", ".join(dict.fromkeys(run.device for run in self.runs))


def _mean_min_max(values: list[float]) -> tuple[float, float, float]:
    return sum(values) / len(values), min(values), max(values)


def steps_per_epoch(train_windows: int, batch_size: int, max_steps_per_epoch: int | None) -> int:
    """Optimiser steps in one pass over the training windows: a last short batch is a step."""
    steps = math.ceil(train_windows / batch_size)
    return min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps


def run_curve(run: SeedRun) -> RunCurve:
    """One finished run's curve, from its history.csv, summary.json and config.json."""
    cfg = RunFolder(run.folder).read_config()
    # An epoch of the protocol is the training between two evaluations (core.protocol.Clock).
    per_epoch = cfg.eval_every or steps_per_epoch(int(run.summary["train_windows"]),
                                                  cfg.batch_size,
                                                  run.summary.get("max_steps_per_epoch"))
    epochs = [int(row["epoch"]) for row in run.history]
    steps = [int(row["step"]) if "step" in row else row["epoch"] * per_epoch
             for row in run.history]
    seconds, total = [], 0.0
    for row in run.history:
        total += row["epoch_seconds"]
        seconds.append(total)
    return RunCurve(run.folder, run.seed, epochs, steps, seconds,
                    [row["val_ppl"] for row in run.history], per_epoch,
                    run.device)


def read_quality_sets(paths: list[Path]) -> list[QualitySet]:
    """One set per path: its finished runs (as the spread report reads them), which must be of
    one protocol; a run not finished is left out, as there."""
    sets = []
    for path in paths:
        groups = read_sets([path])
        if len(groups) > 1:
            raise UserError(f"{path}: holds runs of {len(groups)} protocols "
                            f"({', '.join(group.label for group in groups)}); give each its "
                            "own folder")
        group = groups[0]
        sets.append(QualitySet(path, group.label, [run_curve(run) for run in group.runs],
                               group.reference or group.experiment))
    return sets


def parse_thresholds(text: str) -> tuple[float, ...]:
    """`--thresholds 60.00,58.35`: positive perplexities, in the order given."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--thresholds: '{text}' is not a list of perplexities such as "
                        "60.00,58.35") from None
    if not all(math.isfinite(value) and value > 0 for value in values):
        raise UserError(f"--thresholds: perplexities must be positive numbers, got '{text}'")
    return values


def _figures(values: tuple[float, float, float] | None, reached: int) -> tuple[str, str]:
    """Mean, and min-max, as table cells; "-" where no run reached the threshold, and for the
    range of one run (a "5,600-5,600" would read as if it had one)."""
    if values is None:
        return "-", "-"
    mean, low, high = values
    return f"{mean:,.0f}", "-" if reached < 2 else f"{low:,.0f}-{high:,.0f}"


def _crossing_cell(crossing: Crossing | None) -> str:
    if crossing is None:
        return "not reached"
    return (f"epoch {crossing.epoch}: {crossing.step:,} steps, {crossing.seconds:,.0f} s "
            f"({crossing.ppl:.2f})")


def quality_markdown(sets: list[QualitySet], thresholds: tuple[float, ...], figure_name: str,
                     command: str) -> str:
    """The report: a table per threshold and set, then each set's runs."""
    lines = ["# Time to quality", "", f"Reproduce: `{command}`.", "",
             "Optimiser steps and training seconds until validation perplexity first is at or "
             "below each threshold: the first evaluation that gets there, not the best. Steps: "
             "history.csv's `step` where the run recorded it, else epoch x steps per epoch. "
             "Steps per epoch: the steps between two evaluations, the config's `eval_every` "
             "where it sets one, else a pass (ceil(train_windows / batch_size), capped by "
             "max_steps_per_epoch). Seconds: the "
             "sum of `epoch_seconds` up to that evaluation, so training only: validation time "
             "is excluded. Device: summary.json's `cpu` (the CPU's model, recorded by runs of "
             "this version on), else its `device_kind` (on a CPU, jax records only \"cpu\"); "
             "on a shared machine seconds vary with the "
             "load. Mean, min and max are over the runs that reached the threshold.", "",
             "| Experiment | Set | Threshold | Reached | Steps mean | Steps min-max | "
             "Seconds mean | Seconds min-max | Device |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for threshold in thresholds:
        for group in sets:
            agg = group.aggregate(threshold)
            steps, seconds = _figures(agg.steps, agg.reached), _figures(agg.seconds, agg.reached)
            lines.append(f"| {group.label} | `{group.folder}` | {threshold:.2f} | "
                         f"{agg.reached} of {agg.runs} | {steps[0]} | {steps[1]} | "
                         f"{seconds[0]} | {seconds[1]} | {group.devices} |")
    for group in sets:
        lines += ["", f"## {group.label}, `{group.folder}`", "",
                  "| Seed | Steps per epoch | " + " | ".join(f"First <= {t:.2f}"
                                                            for t in thresholds)
                  + " | Best PPL (epoch) | Device |",
                  "|---:|---:|" + "---|" * len(thresholds) + "---:|---|"]
        for run in group.runs:
            cells = " | ".join(_crossing_cell(run.crossing(t)) for t in thresholds)
            best, epoch = run.best
            lines.append(f"| {run.seed} | {run.steps_per_epoch:,} | {cells} | {best:.2f} "
                         f"({epoch}) | {run.device} |")
    lines += ["", f"![Validation perplexity against optimiser steps]({figure_name})", ""]
    return "\n".join(lines)


def write_time_to_quality(paths: list[Path], out_dir: Path, command: str,
                          thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> list[Path]:
    """time_to_quality.md and time_to_quality.png in `out_dir`, for the sets under `paths`."""
    from tinylm_jax.analysis import plots  # here: plots imports this module's QualitySet

    sets = read_quality_sets(paths)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder")
    figure = plots.time_to_quality_curves(sets, thresholds, out_dir / "time_to_quality.png",
                                          command)
    report = out_dir / "time_to_quality.md"
    write_text_atomic(report, quality_markdown(sets, thresholds, figure.name, command))
    return [report, figure]
