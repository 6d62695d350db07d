"""Turn errors into one line on stderr and an exit code; tracebacks only with --debug."""

from __future__ import annotations

import functools
import sys

import typer

from vlm_export.errors import VlmExportError, is_interruption

STATE = {"debug": False}
USER_ERROR_EXIT = 2
INTERNAL_ERROR_EXIT = 1


# Commands that write artifacts resume an interrupted run from its finished stages; the others just stop.
RESUMING = {"export", "build", "bench", "diff"}


def _interrupted(command) -> str:
    if command.__name__ in RESUMING:
        return "error: interrupted; nothing was written in place -- fix: re-run the same command to resume from the stages that finished"
    return "error: interrupted -- fix: re-run the command"


def handles_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except VlmExportError as exc:
            if STATE["debug"]:
                raise
            print(f"error: {exc.one_line()}", file=sys.stderr)
            raise typer.Exit(USER_ERROR_EXIT) from None
        except KeyboardInterrupt:
            print(_interrupted(command), file=sys.stderr)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # the last line of defence for users
            if STATE["debug"]:
                raise
            if is_interruption(exc):
                print(_interrupted(command), file=sys.stderr)
                raise typer.Exit(130) from None
            detail = " ".join(str(exc).split())[:300]
            print(f"error: internal error {type(exc).__name__}: {detail} -- rerun with --debug and report it", file=sys.stderr)
            raise typer.Exit(INTERNAL_ERROR_EXIT) from None

    return wrapper
