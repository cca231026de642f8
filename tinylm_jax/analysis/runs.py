"""Several finished runs side by side: how they are named, which of the reference's experiments each
reproduces, and Table 1 beside the reference's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm_jax.core.config import UserError
from tinylm_jax.core.metrics import best_epoch
from tinylm_jax.reference.table1 import reference_experiment, reference_result
from tinylm_jax.run.folder import RunFolder


@dataclass(frozen=True)
class FinishedRun:
    """One of several finished runs, as the analyses that compare them name it."""

    folder: RunFolder
    name: str  # the folder's name: the reference's tables know runs named baseline, medium, wider
    label: str  # legend label: the experiment, with the folder where two runs share one
    summary: dict[str, Any]

    @property
    def reference_experiment(self) -> str | None:
        """The reference's experiment this run reproduces, if any."""
        return reference_experiment(self.name, self.summary["experiment"])


def read_finished_runs(run_dirs: list[Path]) -> list[FinishedRun]:
    """Finished runs with their summaries; their folders must have distinct names."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) != len(names):
        raise UserError(f"run folders need distinct names to be compared, got {', '.join(names)}")
    summaries = [RunFolder(d).read_summary() for d in run_dirs]
    experiments = [summary["experiment"] for summary in summaries]
    return [FinishedRun(RunFolder(d), name, e if experiments.count(e) == 1 else f"{e} ({name})", s)
            for d, name, e, s in zip(run_dirs, names, experiments, summaries, strict=True)]


def reference_partners(runs: list[FinishedRun]) -> dict[str, str]:
    """Run label -> the reference experiment it reproduces, each reference experiment for its
    first run only: the reference's curve is drawn once, in that run's colour."""
    partners: dict[str, str] = {}
    for run in runs:
        ref = run.reference_experiment
        if ref is not None and ref not in partners.values():
            partners[run.label] = ref
    return partners


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: our best PPL and epoch per experiment beside the reference's Table 1."""
    lines = ["| Experiment | Best PPL | Epoch | Reference PPL | Reference epoch | PPL difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, summary in summaries.items():
        ours = f"| {summary['experiment']} | {summary['best_val_ppl']:.2f} | " \
               f"{summary['best_epoch']} |"
        ref = reference_result(key, summary["experiment"])
        if ref is None:
            lines.append(f"{ours} - | - | - |")
            continue
        reference_ppl, reference_epoch = ref
        diff = (summary["best_val_ppl"] - reference_ppl) / reference_ppl
        lines.append(f"{ours} {reference_ppl:.2f} | {reference_epoch} | {diff:+.1%} |")
    return "\n".join(lines) + "\n"


def epoch_table(history: list[dict[str, float]], reference_curve: tuple[float, ...]) -> str:
    """Markdown: our validation PPL after each epoch beside the reference's printed log, over the
    epochs either ran; each run's best in bold, the difference where both ran."""
    ours = {int(row["epoch"]): row["val_ppl"] for row in history}
    our_best = best_epoch(history)
    reference_best = best_epoch([{"epoch": e, "val_ppl": v}
                                 for e, v in enumerate(reference_curve, 1)])
    lines = ["| Epoch | Val PPL | Reference val PPL | Difference |", "|---:|---:|---:|---:|"]
    for epoch in range(1, max([*ours, len(reference_curve)]) + 1):
        mine = ref = diff = ""
        if epoch in ours:
            mine = _bold_if(f"{ours[epoch]:.2f}", epoch == our_best)
        if epoch <= len(reference_curve):
            ref = _bold_if(f"{reference_curve[epoch - 1]:.2f}", epoch == reference_best)
        if mine and ref:
            diff = f"{(ours[epoch] - reference_curve[epoch - 1]) / reference_curve[epoch - 1]:+.1%}"
        lines.append(f"| {epoch} | {mine} | {ref} | {diff} |")
    return "\n".join(lines) + "\n"


def _bold_if(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text
