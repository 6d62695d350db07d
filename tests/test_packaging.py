"""The wheel ships every data file the package reads at run time: pyproject's package-data globs
cover each non-Python file under vlm_export/ that git tracks."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vlm_export"


def _tracked_data_files() -> set[str]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the tracked files cannot be listed")
    listed = subprocess.run(["git", "ls-files", "-z", PACKAGE], cwd=ROOT, capture_output=True, text=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout ({listed.stderr.strip()})")
    return {f for f in listed.stdout.split("\0") if f and not f.endswith(".py")}


def _shipped_data_files() -> set[str]:
    """What setuptools' package-data globs match, globbed from each package's directory as it does."""
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = set()
    for package, patterns in package_data.items():
        # "*" applies to every package; there is no package-dir mapping, so a package's directory is its dotted name
        directories = [ROOT / p.parent for p in ROOT.glob(f"{PACKAGE}/**/__init__.py")] if package == "*" \
            else [ROOT / package.replace(".", "/")]
        for directory in directories:
            for pattern in patterns:
                shipped |= {p.relative_to(ROOT).as_posix() for p in directory.glob(pattern) if p.is_file()}
    return shipped


def test_package_data_covers_every_tracked_data_file():
    tracked = _tracked_data_files()
    assert "vlm_export/assets/tiny_tokenizer.model" in tracked  # the listing itself works
    missing = sorted(tracked - _shipped_data_files())
    assert not missing, f"tracked but not in [tool.setuptools.package-data], so absent from the wheel: {missing}"
