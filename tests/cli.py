"""The real CLI in a subprocess, as users run it."""

from __future__ import annotations

import re
import subprocess
import sys

# Progress lines on stderr (vlm_export/progress.py, non-terminal mode): "start  X", "done   X (1.2 s)",
# "failed X (0.1 s)", indented by nesting. They come before an error; the error is still one line.
PROGRESS_LINE = re.compile(r"^\s*(start  |done   |failed )")


def vlm(*args, timeout: int = 900, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_export", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=check)


def message_lines(stderr: str) -> list[str]:
    """stderr without the progress lines: what the command said about its result."""
    return [line for line in stderr.strip().splitlines() if line and not PROGRESS_LINE.match(line)]
