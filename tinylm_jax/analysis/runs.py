"""Several finished runs side by side: how they are named, which of the seed's experiments each
reproduces, and Table 1 beside the seed's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm_jax.core.config import UserError
from tinylm_jax.core.metrics import best_epoch
from tinylm_jax.run.folder import RunFolder
from tinylm_jax.seed.table1 import seed_experiment, seed_result


@dataclass(frozen=True)
class FinishedRun:
    """One of several finished runs, as the analyses that compare them name it."""

    folder: RunFolder
    name: str  # the folder's name: the seed's tables know runs named baseline, medium, wider
    label: str  # legend label: the experiment, with the folder where two runs share one
    summary: dict[str, Any]

    @property
    def seed_experiment(self) -> str | None:
        """The seed's experiment this run reproduces, if any."""
        return seed_experiment(self.name, self.summary["experiment"])


def read_finished_runs(run_dirs: list[Path]) -> list[FinishedRun]:
    """Finished runs with their summaries; their folders must have distinct names."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) != len(names):
        raise UserError(f"run folders need distinct names to be compared, got {', '.join(names)}")
    summaries = [RunFolder(d).read_summary() for d in run_dirs]
    experiments = [summary["experiment"] for summary in summaries]
    return [FinishedRun(RunFolder(d), name, e if experiments.count(e) == 1 else f"{e} ({name})", s)
            for d, name, e, s in zip(run_dirs, names, experiments, summaries, strict=True)]


def seed_partners(runs: list[FinishedRun]) -> dict[str, str]:
    """Run label -> the seed experiment it reproduces, each seed experiment for its first run
    only: the seed's curve is drawn once, in that run's colour."""
    partners: dict[str, str] = {}
    for run in runs:
        seed = run.seed_experiment
        if seed is not None and seed not in partners.values():
            partners[run.label] = seed
    return partners


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: our best PPL and epoch per experiment beside the seed's Table 1."""
    lines = ["| Experiment | Best PPL | Epoch | Seed PPL | Seed epoch | PPL difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, summary in summaries.items():
        ours = f"| {summary['experiment']} | {summary['best_val_ppl']:.2f} | " \
               f"{summary['best_epoch']} |"
        seed = seed_result(key, summary["experiment"])
        if seed is None:
            lines.append(f"{ours} - | - | - |")
            continue
        seed_ppl, seed_epoch = seed
        diff = (summary["best_val_ppl"] - seed_ppl) / seed_ppl
        lines.append(f"{ours} {seed_ppl:.2f} | {seed_epoch} | {diff:+.1%} |")
    return "\n".join(lines) + "\n"


def epoch_table(history: list[dict[str, float]], seed_curve: tuple[float, ...]) -> str:
    """Markdown: our validation PPL after each epoch beside the seed's printed log, over the
    epochs either ran; each run's best in bold, the difference where both ran."""
    ours = {int(row["epoch"]): row["val_ppl"] for row in history}
    our_best = best_epoch(history)
    seed_best = best_epoch([{"epoch": e, "val_ppl": v} for e, v in enumerate(seed_curve, 1)])
    lines = ["| Epoch | Val PPL | Seed val PPL | Difference |", "|---:|---:|---:|---:|"]
    for epoch in range(1, max([*ours, len(seed_curve)]) + 1):
        mine = seed = diff = ""
        if epoch in ours:
            mine = _bold_if(f"{ours[epoch]:.2f}", epoch == our_best)
        if epoch <= len(seed_curve):
            seed = _bold_if(f"{seed_curve[epoch - 1]:.2f}", epoch == seed_best)
        if mine and seed:
            diff = f"{(ours[epoch] - seed_curve[epoch - 1]) / seed_curve[epoch - 1]:+.1%}"
        lines.append(f"| {epoch} | {mine} | {seed} | {diff} |")
    return "\n".join(lines) + "\n"


def _bold_if(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text
