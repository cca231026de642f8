"""What every command line shares: one-line errors, exit codes, and the paths it wrote.

A user's mistake is one `error:` line on stderr and exit code 2, never a traceback; a run stopped
on request prints the command that continues it. Every exit code is decided here.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from tinylm_jax.core.config import UserError
from tinylm_jax.core.train import TrainingDiverged
from tinylm_jax.run.loop import Stop, StopReason

# Exit codes: 0 done (or stopped at --stop-at-step), 2 bad input or a folder/disk problem,
# 3 the loss went non-finite, 130 stopped by SIGINT (Ctrl-C), 143 stopped by SIGTERM.
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT


def stop_exit_code(stop: Stop) -> int:
    """0 for a run that finished, stopped early or stopped at --stop-at-step; for a signal,
    128 + its number, as a shell reports a process the signal ended (SIGTERM where another
    process of the run received it)."""
    if stop.reason != StopReason.SIGNAL:
        return 0
    return 128 + (stop.signal or signal.SIGTERM)


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


def invocation(prog: str | None = None) -> list[str]:
    """How the user ran this command: `prog` (e.g. "tinylm train"), else python and the script."""
    return shlex.split(prog) if prog else ["python", sys.argv[0]]


def command_line(argv: list[str] | None = None, prog: str | None = None) -> str:
    """This command's line as the user typed it: what a report gives to reproduce it."""
    return shlex.join([*invocation(prog), *(sys.argv[1:] if argv is None else argv)])


def resume_command(argv: list[str], prog: str | None = None) -> str:
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
    return shlex.join([*invocation(prog), *kept])


def guarded(action: Callable[[], int | Stop], argv: list[str] | None = None,
            prog: str | None = None) -> int:
    """Run a command: its exit code, or a training run's stop turned into one (with the command
    that continues it where it can be continued); a user's mistake or a diverged run is one
    `error:` line and an exit code."""
    try:
        outcome = action()
        if isinstance(outcome, Stop):
            if outcome.resumable:
                argv = sys.argv[1:] if argv is None else argv
                print(f"{outcome.message}; continue with: {resume_command(argv, prog)}",
                      file=sys.stderr)
            return stop_exit_code(outcome)
        return outcome
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
                action: Callable[[argparse.Namespace], int | Stop]
                ) -> Callable[[list[str] | None, str | None], int]:
    """A command's `main(argv, prog)`: parse with `parser()`, then run `action(args)` `guarded`.
    `prog` names the command as the user typed it (`tinylm train`), for its usage line and the
    command printed to continue a stopped run; by default the script's own name. The action
    finds the whole command line, for a report to give, in `args.command_line`."""
    def main(argv: list[str] | None = None, prog: str | None = None) -> int:
        command = parser()
        if prog:
            command.prog = prog
        args = command.parse_args(argv)
        args.command_line = command_line(argv, prog)
        return guarded(lambda: action(args), argv, prog)

    return main
