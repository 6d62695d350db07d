"""The console script: huge pages first (a re-exec, before the CLI's imports are paid twice), then the app,
then a quick exit."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys


def main() -> None:
    from vlm_export.runtime.huge_pages import reexec_if_wanted

    reexec_if_wanted()  # weights on huge pages: see runtime/huge_pages.py
    from vlm_export.cli.app import app

    try:
        app()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code) -> None:
    """Ends the process once the command is done, without the interpreter's teardown of every module
    and object: measured 1.0-1.4 s after importing transformers' LLaMA and PyTorch, 2.2 s at the end
    of smol's build, seconds a user waits for nothing. What a normal exit does that matters still
    happens: the atexit handlers run (logging's flush, temporary folders) and stdout / stderr are
    flushed; files the command wrote were closed by it. `code` as SystemExit takes it (None: 0; a
    message: printed to stderr, status 1)."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader gone (a closed pipe) has nothing more to get
            stream.flush()
    os._exit(code or 0)
