"""`vlm-export doctor`: what is installed and usable here, what build and run can do, and the fixes."""

from __future__ import annotations

import json

import typer

from vlm_export.cli.errors import handles_errors


@handles_errors
def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text.")):
    """List ONNX Runtime and its providers, the QNN HTP emulator, TensorRT and a GPU, a C compiler and the
    CPU features of the int4 kernel, llama.cpp; then which targets/variants build and run here."""
    from vlm_export.doctor import check_machine, format_report

    report = check_machine()
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
