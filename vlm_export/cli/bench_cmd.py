"""`vlm-export bench [SUITE]`: engines side by side in one run -> JSON + Markdown + PNG reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vlm_export.cli.errors import handles_errors
from vlm_export.cli.options import QuietOpt


@handles_errors
def bench(
    suite: Annotated[Path, typer.Argument(help="A suite file (bench/suites/quick.json, bench/suites/full.json).")] = Path("bench/suites/quick.json"),
    out: Annotated[Path, typer.Option("--out", help="Where the reports go.")] = Path("bench/reports"),
    workdir: Annotated[Path, typer.Option("--workdir", help="Where graphs/, engines/ and bench/cache/ are found or built.")] = Path("."),
    quiet: QuietOpt = False,
):
    """Measure vision latency, TTFT, prefill and decode tok/s, peak RSS and size of every engine in SUITE."""
    from vlm_export.errors import require_export_extra

    require_export_extra("benchmarking (the suite builds its engines from the PyTorch reference)")
    from vlm_export.benchmark.report import write_reports
    from vlm_export.benchmark.suite import load_suite, run_suite
    from vlm_export.progress import configure

    definition = load_suite(suite)
    configure(quiet=quiet)
    report = run_suite(definition, workdir)
    written = write_reports(report, out)
    typer.echo(written["markdown"].read_text().rstrip())
    typer.echo("wrote " + ", ".join(str(p) for p in written.values()))
