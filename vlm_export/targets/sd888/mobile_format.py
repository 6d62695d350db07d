"""ORT-format models (`.ort`) and the reduced-operator config for an ONNX Runtime Mobile minimal build
(`build.sh --minimal_build --include_ops_by_config required_operators_and_types.config`), with
ONNX Runtime's own converter. The tokenizer graph stays `.onnx`: it needs the extensions' custom ops."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

from vlm_export.artifacts import link_or_copy
from vlm_export.errors import VlmExportError

CONFIG = "required_operators_and_types.config"


def convert_to_ort(directory: Path, files: list[str], out: Path) -> dict:
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ort-src-") as work:
        for name in files:  # only the graphs asked for, with their weights
            link_or_copy(directory / name, Path(work) / name)
            if (directory / (name + ".data")).exists():
                link_or_copy(directory / (name + ".data"), Path(work) / (name + ".data"))
        log = io.StringIO()
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it announces every config at INFO
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(Path(work), out, [OptimizationStyle.Fixed], target_platform="arm",
                                           enable_type_reduction=True)
        except Exception as exc:
            raise VlmExportError(f"ORT-format conversion failed ({str(exc).splitlines()[0][:160]})",
                                 "check that the graphs load in onnxruntime") from exc
    config = out / CONFIG
    if not config.is_file():
        raise VlmExportError("ORT-format conversion wrote no operator config", "check the onnxruntime version")
    # The generated header names the (temporary) paths it was made from: keep only file names.
    lines = [line if not line.startswith("# - ") else "# - " + Path(line[4:]).name for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")
    operators = [line for line in lines if line and not line.startswith("#")]
    return {"models": sorted(p.name for p in out.glob("*.ort")), "config": CONFIG, "operator_entries": len(operators)}
