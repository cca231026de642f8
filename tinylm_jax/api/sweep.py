"""A sweep: a grid of overrides times a set of random seeds, each member a normal run folder.

    runs = sweep("baseline", "runs/sweep", {"lr": [1e-3, 3e-3], "dropout": [0, 0.1]}, "0-2",
                 num_epochs=3)

An ablation is the other design: one setting per change, each taking one element away from the
experiment (`--ablate dropout=0 --ablate schedule=plateau,warmup_steps=0`), rather than
every combination; `sweep(..., ablation=[{"dropout": 0}])` trains those settings instead of a
grid's.

The members live in `out_dir/<setting>/seed-N`, a setting's folder named by its overrides as
Hydra names a multirun's (`lr=0.001,dropout=0.1`), so that each setting is a set of seeds that
the spread report reads as it is (`analysis.reports.write_sweep`). Every member is checked before
any trains; `resume=True` continues the members begun and starts the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinylm_jax.api.runs import Run, load_run, resolve, train_in_order
from tinylm_jax.core.config import ExperimentConfig, UserError, parse_override, parse_value
from tinylm_jax.core.config import parse_seeds as parse_seed_spec
from tinylm_jax.run.experiment import PreparedRun, prepare, set_member
from tinylm_jax.run.folder import seed_member

# A setting's folder name keeps the values as typed, so it must be a plain file name.
_FOLDER_SAFE = re.compile(r"[\w.+=,-]+", re.ASCII)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of a grid, or one change of an ablation: its overrides, and the folder (and
    label) they name."""

    overrides: dict[str, Any]
    name: str  # "lr=0.001,dropout=0.1"; "base" for an empty grid


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """`--grid key=v1,v2,...` flags as {field: [values]}, values typed as `--set` types them."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, _ = parse_override(spec, "--grid")
        texts = spec.partition("=")[2].split(",")
        if key in grid:
            raise UserError(f"--grid: '{key}' is given twice")
        if any(not text.strip() for text in texts):
            raise UserError(f"--grid: '{spec}' has an empty value")
        grid[key] = [parse_value(text.strip()) for text in texts]
        if len({repr(value) for value in grid[key]}) < len(grid[key]):
            raise UserError(f"--grid: '{spec}' gives a value twice")
    return grid


def parse_ablation(specs: Sequence[str]) -> list[dict[str, Any]]:
    """`--ablate key=value[,key=value...]` flags as one change each: the fields one element of
    the experiment is taken away by (a schedule, say, with its warmup)."""
    changes = []
    for spec in specs:
        change: dict[str, Any] = {}
        for part in spec.split(","):
            if not part.strip():
                raise UserError(f"--ablate: '{spec}' has an empty part")
            key, value = parse_override(part, "--ablate")
            if key in change:
                raise UserError(f"--ablate: '{spec}' sets '{key}' twice")
            change[key] = value
        changes.append(change)
    return changes


def ablation_settings(changes: Sequence[dict[str, Any]]) -> list[Setting]:
    """One setting per change, in order."""
    if any(not change for change in changes):
        raise UserError("--ablate: a change sets no field")
    return [_setting(dict(change), "--ablate") for change in changes]


def _check_ablation(base: ExperimentConfig, points: list[Setting]) -> None:
    """Refuse a change that is not to the experiment's fields, or that leaves its config as it
    is, or as another change leaves it."""
    seen: list[tuple[ExperimentConfig, str]] = []
    for point in points:
        unknown = sorted(set(point.overrides) - set(base.to_dict()))
        if unknown:
            raise UserError(f"--ablate: {', '.join(unknown)} is not a field of the experiment")
        changed = base.replace(**point.overrides)
        if changed == base:
            raise UserError(f"--ablate: '{point.name}' changes nothing: the experiment has it "
                            "already")
        same = [name for config, name in seen if config == changed]
        if same:
            raise UserError(f"--ablate: '{point.name}' is the same change as '{same[0]}'")
        seen.append((changed, point.name))


def settings(grid: dict[str, list[Any]]) -> list[Setting]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    combos = itertools.product(*(grid[key] for key in keys))
    return [_setting(dict(zip(keys, values, strict=True)), "--grid") for values in combos]


def _setting(overrides: dict[str, Any], flag: str) -> Setting:
    """The setting of `overrides`, its folder named by them ("base" for none)."""
    name = ",".join(f"{key}={_text(value)}" for key, value in overrides.items()) or "base"
    if not _FOLDER_SAFE.fullmatch(name):
        raise UserError(f"{flag}: the setting '{name}' cannot name a folder; use values of "
                        "letters, digits and . + - _")
    return Setting(overrides, name)


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def prepare_sweep(config: str | Path | ExperimentConfig, out_dir: str | Path,
                  grid: dict[str, list[Any]] | None = None, seeds: str | Sequence[int] = "0",
                  dry_run: bool = False, ablation: Sequence[dict[str, Any]] = (),
                  **overrides: Any) -> list[PreparedRun]:
    """Every member of the sweep, checked and ready to train, settings in grid order (or the
    ablation's, when given instead of a grid) and seeds within each. `overrides` are fields or
    run options shared by all members; a dry run leaves the members' folders unchecked, as a
    run's dry run does."""
    if grid and ablation:
        raise UserError("--grid and --ablate are two designs: give one of them")
    spec = seeds if isinstance(seeds, str) else ",".join(str(seed) for seed in seeds)
    points = ablation_settings(ablation) if ablation else settings(grid or {})
    flag = "--ablate" if ablation else "--grid"
    clash = sorted({key for point in points for key in point.overrides}
                   & ({"seed"} | set(overrides)))
    if clash:
        raise UserError(f"{flag}: {', '.join(clash)} is set for the whole sweep already")
    if ablation:
        _check_ablation(resolve(config, Path(out_dir), overrides)[0], points)
    prepared = []
    for point in points:
        for seed in parse_seed_spec(spec):
            out = seed_member(Path(out_dir) / point.name, seed)
            cfg, opts = resolve(config, out, {**overrides, **point.overrides, "seed": seed})
            cfg = cfg.replace(name=f"{cfg.name} [{point.name}]")
            prepared.append(prepare(cfg, set_member(opts), dry_run=dry_run))
    return prepared


def sweep(config: str | Path | ExperimentConfig, out_dir: str | Path,
          grid: dict[str, list[Any]] | None = None, seeds: str | Sequence[int] = "0",
          ablation: Sequence[dict[str, Any]] = (), **overrides: Any) -> list[Run]:
    """Train every member of the sweep (`prepare_sweep`) one after another; the list stops at
    the first member stopped on request (a resume continues from it)."""
    prepared = prepare_sweep(config, out_dir, grid, seeds, ablation=ablation, **overrides)
    stops = train_in_order(prepared)
    return [load_run(one.opts.out_dir, stop) for one, stop in zip(prepared, stops, strict=False)]
