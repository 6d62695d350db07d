"""`vlm-export verify ARTIFACTS`: completeness, checksums and safe external-data paths."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlm_export.cli.errors import handles_errors


@handles_errors
def verify(artifacts: Annotated[Path, typer.Argument(help="An export or build output directory.")]):
    """Check that every file in the manifest is present with its size and sha256."""
    from vlm_export.artifacts import verify as verify_artifacts

    manifest = verify_artifacts(artifacts)
    total = sum(f["bytes"] for f in manifest["files"].values())
    typer.echo(f"ok: {artifacts} — {len(manifest['files'])} files, {total / 1e6:.1f} MB, checksums match")
