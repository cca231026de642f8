"""Command line for `scripts/sweep.py` (`tinylm sweep`): a grid of overrides times a set of
seeds, every member checked first, trained one after another, then the sweep's table."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinylm_jax.analysis import reports
from tinylm_jax.api.runs import train_in_order
from tinylm_jax.api.sweep import parse_ablation, parse_grid, prepare_sweep
from tinylm_jax.cli.console import OneLineParser, entry_point, print_paths
from tinylm_jax.cli.run_experiment import add_training_arguments, overrides, training_options
from tinylm_jax.core.bf16 import keep_host_buffers
from tinylm_jax.core.config import require_positive
from tinylm_jax.run.experiment import describe
from tinylm_jax.run.loop import Stop


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sweep.py",
        description="Sweep an experiment: every combination of the --grid values (or each "
        "--ablate change alone), each trained on every seed of --seeds as a resumable run "
        "folder <out>/<setting>/seed-N, then sweep.md and sweep.png in <out>: one row per "
        "setting, mean ± sd over its seeds.")
    parser.add_argument("experiment", help="an experiment's name (baseline, medium, wider, any "
                        "experiments/*.toml) or a path to an experiment .toml")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="values of one field to sweep, e.g. --grid lr=1e-3,3e-3 "
                        "(repeatable: the grid is every combination)")
    parser.add_argument("--ablate", action="append", default=[], metavar="KEY=V[,KEY=V...]",
                        help="instead of a grid, an ablation: one setting per flag, changing "
                        "only its fields, e.g. --ablate dropout=0 --ablate "
                        "schedule=plateau,warmup_steps=0")
    parser.add_argument("--seeds", default="0", help="random seeds of each setting, e.g. 0-2 "
                        "(default: 0)")
    parser.add_argument("--out", type=Path, help="the sweep's folder (default: "
                        "runs/sweep-<experiment>)")
    parser.add_argument("--resume", action="store_true", help="continue the members begun and "
                        "start the others")
    parser.add_argument("--dry-run", action="store_true", help="check every member and print "
                        "each one's resolved config; train nothing")
    add_training_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int | Stop:
    keep_host_buffers()
    require_positive("--max-epochs", args.max_epochs)
    out = args.out or Path("runs") / f"sweep-{Path(args.experiment).stem}"
    prepared = prepare_sweep(args.experiment, out, parse_grid(args.grid), args.seeds,
                             args.dry_run, parse_ablation(args.ablate), **overrides(args),
                             resume=args.resume,
                             **training_options(args))
    if args.dry_run:
        print("\n\n".join(describe(one) for one in prepared))
        return 0
    stops = train_in_order(prepared)
    if stops[-1].resumable:  # stopped on request: the rest of the sweep waits too
        return stops[-1]
    paths = reports.write_sweep(out, args.command_line)
    print(paths[0].read_text(encoding="utf-8"), end="")
    print_paths(paths)
    return 0


main = entry_point(build_parser, run)
