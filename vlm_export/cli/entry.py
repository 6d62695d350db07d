"""The console script: huge pages first (a re-exec, before the CLI's imports are paid twice), then the app."""

from __future__ import annotations


def main() -> None:
    from vlm_export.runtime.huge_pages import reexec_if_wanted

    reexec_if_wanted()  # weights on huge pages: see runtime/huge_pages.py
    from vlm_export.cli.app import app

    app()
