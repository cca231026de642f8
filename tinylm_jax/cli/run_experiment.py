"""Command line for `scripts/run_experiment.py`: parse, validate, hand over to
`run.experiment`; with `all` or `--analyze`, the analyses follow the training."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tinylm_jax.analysis import reports
from tinylm_jax.api.runs import train_in_order
from tinylm_jax.cli.console import OneLineParser, entry_point, print_paths
from tinylm_jax.core.bf16 import keep_host_buffers
from tinylm_jax.core.config import (
    EXPERIMENT_NAMES,
    ExperimentConfig,
    UserError,
    check_seed,
    load_config,
    parse_override,
    parse_seeds,
    require_positive,
)
from tinylm_jax.core.parallel import initialize_distributed, is_primary
from tinylm_jax.core.train import PRECISIONS
from tinylm_jax.run.experiment import RunOptions, describe, prepare, set_member
from tinylm_jax.run.folder import seed_member
from tinylm_jax.run.loop import Stop
from tinylm_jax.run.products import PRODUCTS


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that trains (train, sweep): the corpus, the fields, the
    budget, the precision and how the steps are shown and launched."""
    parser.add_argument("--data", help="corpus file (default: $TINYLM_DATA, else a verified "
                        "download cached under ~/.cache/tinylm_jax)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override any field of the experiment, e.g. "
                        "--set lr=1e-3 --set positions=rope (repeatable; values are read as "
                        "TOML: 1e-3, 64, true, or a bare word)")
    parser.add_argument("--max-epochs", type=int, help="override the experiment's num_epochs")
    parser.add_argument("--max-steps", type=int, help="override the experiment's max_steps: "
                        "a budget in optimiser steps")
    parser.add_argument("--max-steps-per-epoch", type=int,
                        help="train at most this many steps per epoch (quick runs)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="compute precision; auto = bf16 (on a CPU, the fast path)")
    parser.add_argument("--products", default="auto", choices=PRODUCTS,
                        help="where a CPU's bf16 matrix products run: mkl (Intel MKL's GEMM, "
                        "from the cpu extra), xla, or auto (mkl where it loads and measures "
                        "clearly faster on the model's products, else xla)")
    parser.add_argument("--steps-per-chunk", type=int, help="training steps per compiled call "
                        "(default: 100 on GPU/TPU, 10 on CPU); results do not depend on it")
    parser.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="also "
                        "checkpoint every this many optimiser steps (an epoch's end always is)")
    parser.add_argument("--checkpoint-minutes", type=float, metavar="MINUTES", help="also "
                        "checkpoint once this many minutes have passed since the last one")
    parser.add_argument("--log-every", type=int, default=10, metavar="STEPS", help="steps "
                        "between the training metrics written to metrics.csv and TensorBoard "
                        "(default: 10)")
    parser.add_argument("--no-metrics", action="store_true", help="write no metrics.csv or "
                        "TensorBoard events")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `RunOptions` that `add_training_arguments`'s flags set, by keyword."""
    return dict(data=args.data, precision=args.precision, products=args.products,
                max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.no_progress,
                steps_per_chunk=args.steps_per_chunk, checkpoint_every=args.checkpoint_every,
                checkpoint_minutes=args.checkpoint_minutes, log_every=args.log_every,
                metrics=not args.no_metrics)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="run_experiment.py",
        description="Train a small Transformer language model: the reference report's three "
        "experiments, replayed exactly, or your own experiment (a TOML file that extends one, "
        "and --set for any field).")
    parser.add_argument("experiment", help=f"{', '.join(EXPERIMENT_NAMES)} (the reference's), "
                        "all (the three in order, plus a comparison table), the name of any "
                        "experiments/*.toml, or a path to an experiment .toml")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<experiment>; "
                        "with 'all', the parent of the three run folders, default runs/)")
    parser.add_argument("--seed", type=int, help="override the experiment's random seed")
    parser.add_argument("--seeds", help="train a set of runs that differ only in the random seed "
                        "(initialisation and data order), one after another, e.g. 0-4 or 0,2,7: "
                        "run folders seed-N inside --out; --resume continues the set")
    parser.add_argument("--devices", type=int, help="split each batch over the first N devices "
                        "(default: all devices, of every process)")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, to train as one of "
                        "several processes (with --num-processes and --process-id)")
    parser.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    parser.add_argument("--process-id", type=int, default=0, help="this process's rank")
    parser.add_argument("--resume", action="store_true", help="continue from the latest "
                        "checkpoint in the run folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--stop-at-step", type=int, help="checkpoint and stop once the run has "
                        "taken this many optimiser steps in all (e.g. to fit a time slot); "
                        "--resume continues it")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, "
                        "parameter count and window counts; train nothing")
    add_training_arguments(parser)
    parser.add_argument("--analyze", action="store_true", help="after each run, write every "
                        "analysis of `scripts/analyze.py all` into its run folder")
    return parser


def overrides(args: argparse.Namespace, seed: int | None = None) -> dict[str, Any]:
    """The fields the command line sets: --set's, then --seed's, --max-epochs' and
    --max-steps'."""
    fields = dict(parse_override(text) for text in args.overrides)
    named = {"seed": seed, "num_epochs": args.max_epochs, "max_steps": args.max_steps}
    return {**fields, **{key: value for key, value in named.items() if value is not None}}


def _config(name: str, args: argparse.Namespace, seed: int | None) -> ExperimentConfig:
    return load_config(name, overrides(args, seed), overrides_source="command line")


def _runs(args: argparse.Namespace) -> list[tuple[str, int | None, Path]]:
    """(experiment, random seed or None for the experiment's own, run folder) of every run the
    command line asks for, in the order they train."""
    run_all = args.experiment == "all"
    names = list(EXPERIMENT_NAMES) if run_all else [args.experiment]
    root = args.out or Path("runs")  # with `all`, the parent of the run folders
    runs = []
    for name in names:
        out = root / Path(name).stem if run_all or args.out is None else args.out
        if args.seeds is None:
            runs.append((name, args.seed, out))
        else:
            runs += [(name, seed, seed_member(out, seed)) for seed in parse_seeds(args.seeds)]
    return runs


def run(args: argparse.Namespace) -> int | Stop:
    if args.coordinator:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    elif (args.num_processes, args.process_id) != (1, 0):
        raise UserError("--num-processes and --process-id need --coordinator")
    keep_host_buffers()  # after jax.distributed starts (it reads the backend), before any step
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    require_positive("--max-epochs", args.max_epochs)
    if args.seed is not None:
        if args.seeds is not None:
            raise UserError("--seed and --seeds exclude each other")
        check_seed(args.seed, "--seed")
    several = args.experiment == "all" or args.seeds is not None
    prepared = []
    for name, seed, out in _runs(args):  # validate every run before training any
        opts = RunOptions(out_dir=out, resume=args.resume, overwrite=args.overwrite,
                          devices=args.devices, stop_at_step=args.stop_at_step,
                          **training_options(args))
        prepared.append(prepare(_config(name, args, seed), set_member(opts) if several else opts,
                                dry_run=args.dry_run))
    if args.dry_run:
        print("\n\n".join(describe(one) for one in prepared))
        return 0
    stops = train_in_order(prepared)
    if stops[-1].resumable:  # stopped on request: the rest of the set waits too
        return stops[-1]
    run_dirs = [one.opts.out_dir for one in prepared]
    if not is_primary():  # the files below are process 0's to write
        return 0
    if args.experiment == "all" and args.seeds is None:
        paths = reports.write_comparison(run_dirs, args.out or Path("runs"))
        print(paths[0].read_text(encoding="utf-8"), end="")
        print_paths(paths)
    if args.analyze:  # after all training, so that an analysis failing costs no run
        for run_dir in run_dirs:
            print_paths(reports.analyze_run(run_dir, args.data))
    return 0


main = entry_point(build_parser, run)
