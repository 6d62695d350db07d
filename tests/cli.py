"""The real CLI in a subprocess, as users run it."""

from __future__ import annotations

import subprocess
import sys


def vlm(*args, timeout: int = 900, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_export", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=check)
