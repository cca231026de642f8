"""Reference section 5.2 measured: validation perplexity against the training budget spent.

The reference claims that a longer context does not pay in a fixed time budget. After each epoch a
run has spent, three ways:
  seconds  training time so far: history.csv's epoch_seconds summed (the training steps,
           compilation included, validation excluded), on the run's own hardware
  tokens   training tokens seen: epochs x windows per epoch x seq_len
  flops    training FLOPs: optimiser steps x `model.model_flops_per_step`
Tokens and FLOPs do not depend on the hardware. The reference's own curves (its printed
perplexities) go on the same token and FLOP axes from its configs and corpus; it printed no times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tinylm_jax.analysis.runs import FinishedRun
from tinylm_jax.core.config import ExperimentConfig, load_config
from tinylm_jax.core.data import Splits, num_batches
from tinylm_jax.core.model import model_flops_per_step
from tinylm_jax.reference.table1 import REFERENCE_NUM_TOKENS, REFERENCE_VAL_PPL

BUDGETS = ("seconds", "tokens", "flops")
BUDGET_LABELS = {"seconds": "Training time (s)", "tokens": "Training tokens seen",
                 "flops": "Training FLOPs"}
REFERENCE_HARDWARE = "the reference's CUDA GPU, fp16 autocast"


@dataclass(frozen=True)
class BudgetCurve:
    """Validation perplexity after each epoch, and the budget spent by then."""

    label: str
    hardware: str
    ppl: np.ndarray  # (E,) validation perplexity after epochs 1..E
    spent: dict[str, np.ndarray]  # BUDGETS name (seconds only where timed), or "steps" -> (E,)

    @property
    def best(self) -> tuple[float, int]:
        """The lowest perplexity and its (first) epoch."""
        epoch = int(np.argmin(self.ppl))
        return float(self.ppl[epoch]), epoch + 1

    def within(self, budget: str, amount: float) -> tuple[float, int] | None:
        """The best perplexity among the epochs finished within `amount` of `budget` (what the
        best checkpoint holds then) and how many epochs that is; None before the first."""
        done = int(np.searchsorted(self.spent[budget], amount * (1 + 1e-9), side="right"))
        return (float(np.min(self.ppl[:done])), done) if done else None


def hardware(summary: dict[str, Any]) -> str:
    """Where a run trained, from its summary: "cpu, float32", "2 x NVIDIA H100, bfloat16"."""
    kind = summary["device_kind"]
    devices = summary["devices"]
    where = kind if devices == 1 else f"{devices} x {kind}"
    if kind.lower() != summary["backend"].lower():
        where += f" ({summary['backend']})"
    return f"{where}, {summary['precision']}"


def _curve(label: str, where: str, cfg: ExperimentConfig, train_windows: int,
           max_steps: int | None, ppl: np.ndarray, seconds: np.ndarray | None = None
           ) -> BudgetCurve:
    steps = num_batches(train_windows, cfg.batch_size)
    steps = steps if max_steps is None else min(steps, max_steps)
    windows = min(train_windows, steps * cfg.batch_size)
    epochs = np.arange(1, len(ppl) + 1)
    spent = {"steps": epochs * steps, "tokens": epochs * float(windows * cfg.seq_len),
             "flops": epochs * steps * model_flops_per_step(cfg)}
    if seconds is not None:
        spent["seconds"] = np.cumsum(seconds)
    return BudgetCurve(label, where, np.asarray(ppl, np.float64), spent)


def run_curve(run: FinishedRun) -> BudgetCurve:
    """A finished run's curve, from its history.csv, config.json and summary.json."""
    cfg, record = run.folder.read_record()
    history = run.folder.read_history()
    ppl = np.array([r["val_ppl"] for r in history])
    seconds = np.array([r["epoch_seconds"] for r in history])
    if cfg.max_steps or cfg.eval_every:  # a step-based protocol: its epochs are not passes
        steps = np.array([r["step"] for r in history], np.float64)
        spent = {"steps": steps, "tokens": steps * cfg.batch_size * cfg.seq_len,
                 "flops": steps * model_flops_per_step(cfg), "seconds": np.cumsum(seconds)}
        return BudgetCurve(run.label, hardware(run.summary), ppl.astype(np.float64), spent)
    return _curve(run.label, hardware(run.summary), cfg, run.summary["train_windows"],
                  record.get("max_steps_per_epoch"), ppl, seconds)


def reference_curve(experiment: str) -> BudgetCurve:
    """The reference's curve for one of its experiments, on the windows of its own corpus."""
    cfg = load_config(experiment)
    splits = Splits.of(REFERENCE_NUM_TOKENS, cfg.seq_len, cfg.train_fraction)
    return _curve(f"reference report: {experiment}", REFERENCE_HARDWARE, cfg, splits.num_train,
                  None, np.array(REFERENCE_VAL_PPL[experiment]))


def common_budgets(curves: list[BudgetCurve]) -> dict[str, float]:
    """The largest budget of each kind that every curve reached: the smallest of their totals."""
    return {budget: min(float(curve.spent[budget][-1]) for curve in curves) for budget in BUDGETS}


def _amount(budget: str, value: float) -> str:
    if budget == "seconds":
        return f"{value:,.0f} s"
    if budget == "tokens":
        return f"{value / 1e6:,.1f}M tokens" if value >= 1e6 else f"{value:,.0f} tokens"
    return f"{value:.2e} FLOPs"


def _at(curve: BudgetCurve, budget: str, amount: float) -> str:
    if budget not in curve.spent:
        return "-"
    reached = curve.within(budget, amount)
    return "-" if reached is None else f"{reached[0]:.2f} ({reached[1]} ep.)"


def _steps_per_minute(curve: BudgetCurve) -> str:
    if "seconds" not in curve.spent:
        return "-"
    return f"{60 * curve.spent['steps'][-1] / curve.spent['seconds'][-1]:,.1f}"


def budget_markdown(runs: list[BudgetCurve], references: list[BudgetCurve], figure_name: str
                    ) -> str:
    """The table that judges the claim: each run's best perplexity, and the perplexity it had
    reached by the budgets every one of `runs` reached; the reference's curves below."""
    common = common_budgets(runs)
    places = {curve.hardware for curve in runs}
    lines = ["# Validation perplexity against the training budget", "",
             f"![perplexity against budget]({figure_name})", "",
             "Budgets after each epoch: training time (history.csv's epoch_seconds summed: the "
             "training steps, compilation included, validation excluded) on each run's hardware; "
             "training tokens seen (epochs x windows per epoch x seq_len); training FLOPs "
             "(optimiser steps x 6 per matmul parameter per token plus attention's 12 x layers "
             "x L x D per token). \"PPL at\" a budget is the best validation perplexity among "
             "the epochs finished within it (what the best checkpoint holds then), with their "
             "count; the budgets are the smallest totals among the runs, the most that every "
             "run spent. Reference rows: the reference notebook's printed perplexities on its own "
             "windows (it printed no times)."]
    if len(places) > 1:
        lines += ["", "The runs trained on different hardware, so their time budgets do not "
                  "compare; tokens and FLOPs do."]
    at = " | ".join(f"PPL at {_amount(budget, common[budget])}" for budget in BUDGETS)
    lines += ["", f"| Run | Hardware | Epochs | Steps/min | Best PPL (epoch) | {at} |",
              "|---|---|---:|---:|---:|" + "---:|" * len(BUDGETS)]
    for curve in runs + references:
        best, epoch = curve.best
        cells = " | ".join(_at(curve, budget, common[budget]) for budget in BUDGETS)
        lines.append(f"| {curve.label} | {curve.hardware} | {len(curve.ppl)} | "
                     f"{_steps_per_minute(curve)} | {best:.2f} ({epoch}) | {cells} |")
    return "\n".join(lines) + "\n"
