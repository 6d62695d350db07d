"""The `vlm-export` typer app. Commands are registered here and live one per module."""

from __future__ import annotations

import logging
import os

import typer

from vlm_export.cli.bench_cmd import bench
from vlm_export.cli.build_cmd import build
from vlm_export.cli.diff_cmd import diff
from vlm_export.cli.doctor_cmd import doctor
from vlm_export.cli.errors import STATE
from vlm_export.cli.export_cmd import export
from vlm_export.cli.generate_cmd import generate
from vlm_export.cli.inspect_cmd import inspect
from vlm_export.cli.run_cmd import run
from vlm_export.cli.verify_cmd import verify

app = typer.Typer(
    name="vlm-export",
    help="Export MobileVLM-class vision-language models to fast edge artifacts (ONNX, QNN, TensorRT).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress."),
):
    STATE["debug"] = debug
    # Our own progress at INFO with -v; libraries (onnxscript, transformers) stay at WARNING.
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlm_export").setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    if not debug:
        # Library chatter (progress bars, legacy-tokenizer notices) is not for end users. Set by
        # environment, which transformers reads when (and only if) a command imports it: importing it
        # here would cost every command ~1 s, and `run` PyTorch (see keep_transformers_off_torch).
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


app.command()(inspect)
app.command()(generate)
app.command()(export)
app.command()(build)
app.command()(run)
app.command()(bench)
app.command()(diff)
app.command()(verify)
app.command()(doctor)
