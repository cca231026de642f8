"""An ablation's table: what each element of an experiment is worth, judged against the seed
spread of the experiment itself.

The full recipe is a set of runs that differ only in the seed; each ablated setting (a sweep's
`--ablate` member, usually one seed) takes one element away. An element's worth is the ablated
setting's mean best perplexity less the full recipe's mean (positive: the element helps). A
difference "exceeds the spread" when the ablated mean falls outside the full recipe's range over
its seeds: with three seeds or so, the range is the one honest measure of what the seed alone
moves (`analysis.spread`'s note on the bootstrap).
"""

from __future__ import annotations

from tinylm_jax.analysis.spread import ExperimentSpread, Spread, best_epochs_text
from tinylm_jax.core.config import UserError
from tinylm_jax.run.folder import RunFolder


def changes(group: ExperimentSpread, full: ExperimentSpread) -> str:
    """The fields in which `group`'s config differs from the full recipe's, as "key=value"
    (its name and seed aside); refused where anything else of the protocol differs."""
    if group.setup != full.setup:
        raise UserError(f"ablation: {group.label} ran another precision, step limit or corpus "
                        f"than {full.label}: only the recipe may differ")
    ours, theirs = group.config.to_dict(), full.config.to_dict()
    differ = [f"{key}={ours[key]}" for key in ours
              if key not in ("name", "seed") and ours[key] != theirs[key]]
    if not differ:
        raise UserError(f"ablation: {group.label} has the full recipe's config: it takes "
                        "nothing away")
    return ",".join(differ)


def ran_on(group: ExperimentSpread) -> str:
    """Where a set's runs trained: each distinct device (`SeedRun.device`) with the products its
    matrices took, so rows from other machines show."""
    places: list[str] = []
    for run in group.runs:
        place = f"{run.device}, {RunFolder(run.folder).recorded('products')} products"
        if place not in places:
            places.append(place)
    return "; ".join(places)


def verdict(value: float, full: Spread) -> str:
    """Whether `value` lies outside the full recipe's range over its seeds, and on which side."""
    if full.n < 2:
        return "- (the full recipe has one run: no spread)"
    if value > full.high:
        return "yes: worse than every seed"
    if value < full.low:
        return "yes: better than every seed"
    return "no: inside the seeds' range"


def ablation_markdown(full: ExperimentSpread, ablated: list[ExperimentSpread], command: str
                      ) -> str:
    """The ablation's table: a row per ablated set, named by what it changed."""
    best = full.best
    by_seed = {run.seed: run.summary["best_val_ppl"] for run in full.runs}
    seeds = ", ".join(str(run.seed) for run in full.runs)
    params = full.runs[0].summary.get("param_count")
    lines = [
        "# Ablation", "",
        f"Each row takes one element away from **{full.experiment}** and trains it again. "
        f"Reproduce: `{command}`. Worth: the row's mean best validation perplexity less the full "
        "recipe's mean (positive: the element helps). Same seed: less the full recipe's run of "
        "the row's seed, where it has one (a paired difference: the same initialisation and data "
        "order but for the change). A difference exceeds the spread when the row lies outside "
        "the full recipe's range over its seeds.", "",
        f"The full recipe: {best.n} runs (seeds {seeds}), best PPL {best.mean_and_sd()}, "
        f"range {best.range_text()}, best epochs "
        f"{best_epochs_text(full.best_epochs, full.still_improving)}; last epoch "
        f"{full.last.mean_and_sd()}"
        + (f"; {params:,} parameters" if params else "") + f"; ran on {ran_on(full)}.", "",
        "| Taken away (setting) | Runs (seeds) | Parameters | Best PPL | Best epochs | Last PPL | "
        "Worth | Worth in sd | Same seed | Exceeds the spread | Ran on |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
    for group in ablated:
        value = group.best.mean
        worth = value - best.mean
        in_sd = f"{worth / best.std:+.1f}" if best.n > 1 and best.std else "-"
        paired = [run.summary["best_val_ppl"] - by_seed[run.seed] for run in group.runs
                  if run.seed in by_seed]
        same = f"{sum(paired) / len(paired):+.2f}" if paired else "-"
        group_params = group.runs[0].summary.get("param_count")
        lines.append(
            f"| {changes(group, full)} | {group.best.n} "
            f"({', '.join(str(run.seed) for run in group.runs)}) | "
            f"{f'{group_params:,}' if group_params else '-'} | {group.best.mean_and_sd()} | "
            f"{best_epochs_text(group.best_epochs, group.still_improving)} | "
            f"{group.last.mean:.2f} | {worth:+.2f} | {in_sd} | {same} | {verdict(value, best)} | "
            f"{ran_on(group)} |")
    lines.append("")
    return "\n".join(lines)
