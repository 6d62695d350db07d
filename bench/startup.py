"""Whole-process cost of one question: `vlm-export run DIR --max-new-tokens 1`, wall time and peak RSS.

    python bench/startup.py DIR [DIR ...] [--runs 6] [--tree PATH]

Each run is a fresh process, as a user's is. The first run of a set also fills the per-file
checksum cache (`verify` hashes each file once per version); the median of the others is the
number that matters. `--tree` runs another checkout's code (e.g. a git worktree of an older
commit) with the same interpreter, to compare before and after side by side.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time


def measure(directory: str, runs: int, tree: str | None) -> str:
    env = {**os.environ, **({"PYTHONPATH": tree} if tree else {})}
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        # cwd outside any checkout: `python -m` looks in the working directory before PYTHONPATH
        done = subprocess.run([sys.executable, "-m", "vlm_export", "run", os.path.abspath(directory), "--prompt",
                               "What is the capital of France?", "--max-new-tokens", "1"],
                              env=env, capture_output=True, text=True, cwd="/", check=False)
        walls.append(time.perf_counter() - start)
        if done.returncode:
            raise SystemExit(done.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    rest = walls[1:] or walls
    return (f"| {tree or 'this checkout'} | {directory} | {walls[0]:.2f} | {statistics.median(rest):.2f} | "
            f"{min(rest):.2f}-{max(rest):.2f} | {peak:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--tree", default=None)
    args = parser.parse_args()
    print("| code | artifact set | first run s | median s | min-max s | peak RSS MB (so far) |")
    print("|---|---|---|---|---|---|")
    for directory in args.dirs:
        print(measure(directory, args.runs, args.tree), flush=True)


if __name__ == "__main__":
    main()
