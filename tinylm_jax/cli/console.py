"""What every command line shares: one-line errors, exit codes, and the paths it wrote.

A user's mistake is one `error:` line on stderr and exit code 2, never a traceback; a stopped run
prints the command that continues it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from tinylm_jax.core.config import UserError
from tinylm_jax.core.train import TrainingDiverged
from tinylm_jax.run.experiment import RunStopped

# Exit codes: 0 done (or stopped at --stop-at-step), 2 bad input or a folder/disk problem,
# 3 the loss went non-finite, 130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM.
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line and exit code 2, like every other.

    Flags must be spelled out (no `--over` for `--overwrite`), so that the resume command printed
    after a stop can be derived from the command line reliably.
    """

    def __init__(self, **kwargs: typing.Any):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def print_paths(paths: list[Path]) -> None:
    for path in paths:
        print(f"wrote {path}")


def resume_command(argv: list[str]) -> str:
    """The command line that continues this one: the same, with --resume and no --overwrite
    or --stop-at-step."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--stop-at-step":
            skip = True
        elif arg != "--overwrite" and not arg.startswith("--stop-at-step="):
            kept.append(arg)
    if "--resume" not in kept:
        kept.append("--resume")
    return shlex.join(["python", sys.argv[0], *kept])


def guarded(action: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run a command: a user's mistake or a diverged run is one `error:` line and an exit code."""
    try:
        return action()
    except RunStopped as err:
        print(f"{err}; continue with: {resume_command(sys.argv[1:] if argv is None else argv)}",
              file=sys.stderr)
        return err.exit_code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except OSError as err:  # a file the user pointed at cannot be read or written
        print(f"error: {err.filename or ''}: {err.strerror or err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted at once: nothing new was checkpointed; --resume continues from the "
              "last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry_point(parser: Callable[[], argparse.ArgumentParser],
                action: Callable[[argparse.Namespace], int]) -> Callable[[list[str] | None], int]:
    """A command's `main(argv)`: parse with `parser()`, then run `action(args)` `guarded`."""
    def main(argv: list[str] | None = None) -> int:
        args = parser().parse_args(argv)
        return guarded(lambda: action(args), argv)

    return main
