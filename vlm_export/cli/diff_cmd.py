"""`vlm-export diff GRAPHS [VARIANT ...]`: accuracy of every artifact against the PyTorch reference."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.options import QuietOpt

DIFF_FAILED_EXIT = 1


@handles_errors
def diff(
    graphs: Annotated[Path, typer.Argument(help="Exported graphs (`vlm-export export`), the fp32 baseline.")],
    variants: Annotated[list[Path] | None, typer.Argument(help="Built variant directories to compare too.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report directory (default <graphs>-diff).")] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Greedy tokens per end-to-end prompt.")] = 16,
    eval_tokens: Annotated[int | None, typer.Option("--eval-tokens", min=2, help="Eval-prose positions scored end to end "
                                                       "(perplexity, mean KL, top-1 against the baseline; default 512).")] = None,
    quiet: QuietOpt = False,
):
    """Per-graph (Polygraphy), per-layer and end-to-end diffs; exit code 1 when a tolerance fails."""
    from vlm_export.errors import require_export_extra

    require_export_extra("diffing against the PyTorch reference (Polygraphy)")
    from vlm_export.diff.api import DIFF_EVAL_TOKENS, diff_artifacts, failure_summary, localisation_lines
    from vlm_export.progress import configure

    out = out or graphs.with_name(graphs.name + "-diff")
    configure(quiet=quiet)
    report = diff_artifacts(graphs, list(variants or []), out, new_tokens, eval_tokens or DIFF_EVAL_TOKENS)
    typer.echo((out / "diff.md").read_text().rstrip())
    where = localisation_lines(report)
    if where:  # after the report, so the last lines say where a decoder goes wrong
        typer.echo("\n" + "\n".join(where))
    if not report["passed"]:
        at = "".join(f"; {line}" for line in localisation_lines(report, named_only=True))
        print(f"error: diff failed: {failure_summary(report)}{at} -- see {out / 'diff.md'}", file=sys.stderr)
        raise typer.Exit(DIFF_FAILED_EXIT)
