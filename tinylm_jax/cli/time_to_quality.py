"""Command line of `scripts/time_to_quality.py` (`tinylm time-to-quality`): optimiser steps and
training seconds until validation first reaches each threshold, per set of seeds, with the
curve of validation perplexity against steps."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinylm_jax.analysis.time_to_quality import (
    DEFAULT_THRESHOLDS,
    parse_thresholds,
    write_time_to_quality,
)
from tinylm_jax.cli.console import OneLineParser, entry_point, print_paths


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="time_to_quality.py",
        description="Steps and seconds until validation perplexity first reaches each "
        "threshold, per set of runs that differ only in the seed: time_to_quality.md and "
        "time_to_quality.png in --out.")
    parser.add_argument("set_dirs", type=Path, nargs="+", metavar="SET_DIR",
                        help="a folder of seed-N run folders (--seeds), or one run folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--thresholds", default=",".join(f"{t:.2f}" for t in DEFAULT_THRESHOLDS),
                        help="validation perplexities, comma-separated (default: the "
                        "reference's baseline and wider bests, %(default)s)")
    return parser


def run(args: argparse.Namespace) -> int:
    paths = write_time_to_quality(args.set_dirs, args.out, args.command_line,
                                  parse_thresholds(args.thresholds))
    print(paths[0].read_text(encoding="utf-8"), end="")
    print_paths(paths)
    return 0


main = entry_point(build_parser, run)
