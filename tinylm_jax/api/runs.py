"""Training and reading runs from Python, as the command line does.

    run = train("baseline", "runs/baseline", num_epochs=2, precision="bf16")
    run.summary["best_val_ppl"], run.history[-1], run.best_params, run.best.model
    runs = train_seeds("baseline", "runs/baseline", "0-4")  # seed-0 ... seed-4, one by one
    run = load_run("runs/baseline")

Keyword overrides are fields of the experiment (`num_epochs`, `seed`, `lr`, ...) or options of
the run (`precision`, `products`, `data`, `max_steps_per_epoch`, `resume`, `overwrite`,
`progress`, `steps_per_chunk`, `devices`, `stop_at_step`, `checkpoint_every`,
`checkpoint_minutes`, `metrics`, `log_every`). Every run records what the command line's does
(`default_hooks`). Bad input raises `UserError` before anything is written or trained.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tinylm_jax.analysis.attention_stats import AttentionRecord
from tinylm_jax.core.config import ExperimentConfig, UserError, load_config, parse_seeds
from tinylm_jax.run import checkpoint
from tinylm_jax.run.experiment import (
    PreparedRun,
    RunOptions,
    prepare,
    set_member,
    train_prepared,
)
from tinylm_jax.run.folder import RunFolder, seed_member
from tinylm_jax.run.loop import EpochHook, Stop

RUN_OPTIONS = tuple(field.name for field in dataclasses.fields(RunOptions)
                    if field.name != "out_dir")


@dataclasses.dataclass(frozen=True)
class Run:
    """A run folder as Python sees it; its params are restored on first use."""

    folder: Path
    config: ExperimentConfig
    history: list[dict[str, float]]  # one row per finished epoch (history.csv)
    summary: dict[str, Any] | None  # summary.json; None until the protocol has ended
    stop: Stop | None = None  # why `train` returned; None for a run loaded from its folder

    @functools.cached_property
    def best(self) -> checkpoint.LoadedRun:
        """The best epoch's checkpoint (the protocol's best epoch), ready for the analyses: its
        model, params, tokenizer and record."""
        return checkpoint.load_run(self.folder, "best")

    @functools.cached_property
    def latest(self) -> checkpoint.LoadedRun:
        """The latest checkpoint: the last epoch, or where a stop left the run."""
        return checkpoint.load_run(self.folder, "latest")

    @property
    def best_params(self) -> Any:
        return self.best.params

    @property
    def latest_params(self) -> Any:
        return self.latest.params


def load_run(path: str | Path, stop: Stop | None = None) -> Run:
    """The run in folder `path`: its config, history and summary (if it finished)."""
    folder = RunFolder(path)
    finished = folder.has_summary()
    history = folder.read_history() if folder.has_history() else []
    return Run(Path(path), folder.read_config(), history,
               folder.read_summary() if finished else None, stop)


def default_hooks(run: PreparedRun) -> list[EpochHook]:
    """What every run records beside its history: the attention statistics, from the initial
    params on (attention_by_epoch.csv)."""
    return [AttentionRecord.for_run(run.cfg, run.opts.precision, run.data)]


def train(config: str | Path | ExperimentConfig, out_dir: str | Path, **overrides: Any) -> Run:
    """Train `config` (an experiment's name, a TOML path or a config) in run folder `out_dir`
    until its protocol ends or a stop is asked for (`Run.stop` says which)."""
    prepared = prepare(*resolve(config, Path(out_dir), overrides))
    return load_run(out_dir, train_in_order([prepared])[0])


def train_seeds(config: str | Path | ExperimentConfig, out_dir: str | Path,
                seeds: str | Iterable[int], **overrides: Any) -> list[Run]:
    """A set of runs that differ only in the random seed, one after another, in run folders
    `out_dir/seed-N`; with `resume=True`, members not begun yet start. `seeds` is a list of
    seeds or a spec such as "0-4". Every member is checked before any trains; the set stops at
    the first member stopped on request."""
    spec = seeds if isinstance(seeds, str) else ",".join(str(seed) for seed in seeds)
    prepared = [prepare(cfg, set_member(opts)) for cfg, opts in (
        resolve(config, seed_member(Path(out_dir), seed), {**overrides, "seed": seed})
        for seed in parse_seeds(spec))]
    stops = train_in_order(prepared)  # shorter than `prepared` where a member was stopped
    return [load_run(one.opts.out_dir, stop)
            for one, stop in zip(prepared, stops, strict=False)]


def train_in_order(prepared: Sequence[PreparedRun]) -> list[Stop]:
    """Train prepared runs one after another, each with the default hooks, and say why each
    stopped; the first stopped on request ends the list (the rest wait for a resume)."""
    stops: list[Stop] = []
    for one in prepared:
        stops.append(train_prepared(one, default_hooks(one)).stop)
        if stops[-1].resumable:
            break
    return stops


def resolve(config: str | Path | ExperimentConfig, out_dir: Path, overrides: dict[str, Any]
            ) -> tuple[ExperimentConfig, RunOptions]:
    """The config with its overridden fields, and the run's options."""
    cfg = config if isinstance(config, ExperimentConfig) else load_config(str(config))
    fields = {key: value for key, value in overrides.items() if key not in RUN_OPTIONS}
    unknown = sorted(set(fields) - set(cfg.to_dict()))
    if unknown:
        raise UserError(f"unknown override(s) {', '.join(unknown)}; an override is a field of "
                        f"the experiment or one of {', '.join(RUN_OPTIONS)}")
    options = {key: value for key, value in overrides.items() if key in RUN_OPTIONS}
    return (cfg.replace(**fields) if fields else cfg), RunOptions(out_dir=out_dir, **options)
