"""`--target sd888`: a Snapdragon 888 phone (SoC SM8350: Hexagon v68 NPU, Kryo 680 CPU, 8 GB).

    fp32-static/  the static layout (batch 1, prefill chunk, KV buffer) in fp32: the QNN variant's
                  source and its accuracy reference (only when the decoder goes onto the NPU; with
                  --qnn-graphs vision the QNN variant is the dynamic graphs with vision on the NPU)
    qnn/          vision and decoder graphs quantized for the HTP (QDQ: uint16 activations, uint8
                  weights) and compiled to QNN context binaries for the SoC; embedding lookup and
                  tokenizer on the CPU. Built and run here on the emulated HTP, CPU fallback off.
    fp32-inplace/ the inplace layout in fp32 (GroupQueryAttention over a K/V buffer written in
                  place, as `--target cpu`): the CPU variants' source and accuracy reference
    cpu-int8/     XNNPACK / CPU: vision int8 QDQ (uint8 activations, per-channel int8 weights, the
    cpu-int4/     form of XNNPACK's QLinear kernels), fp32-inplace's decoder with weights in 8 / 4
                  bits (MatMulNBits), mobile/ with `.ort` models and the reduced-operator config,
                  and a static XNNPACK partition report.

Every variant is a complete artifact set that `vlm-export run` takes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_export.artifacts import MANIFEST, atomic_directory, stage_key, verify, write_json_atomic
from vlm_export.errors import MissingExtraError, VlmExportError
from vlm_export.progress import stage
from vlm_export.runtime.runners.qnn_ep import SOCS
from vlm_export.spec.graph_io import GraphRole, Layout
from vlm_export.targets.sd888.report import phone_fit, report_markdown

VARIANTS = ("qnn", "cpu-int8", "cpu-int4")
RECIPE_VERSION = 2  # part of the build-cache key: bump when a variant is made differently
QNN_GRAPHS = ("vision", "decoder")
SOURCES = ("fp32-static", "fp32-inplace")  # fp32 stages the variants are made from (not shipped)


@dataclass(frozen=True)
class Profile:
    variants: tuple[str, ...] = VARIANTS
    soc: str = "SM8350"
    qnn_graphs: tuple[str, ...] = QNN_GRAPHS  # graphs put on the NPU; the others run on the CPU
    max_context: int = 1024  # KV buffer of the static graphs
    prefill_chunk: int = 128
    qnn_16bit_weights: tuple[str, ...] = ()  # node-name patterns whose weights stay 16-bit on the HTP
    calibration: str | None = None
    eval_tokens: int = 16

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise VlmExportError(f"unknown sd888 variant(s) {', '.join(unknown)}", f"use {', '.join(VARIANTS)}")
        if self.soc not in SOCS:
            raise VlmExportError(f"unknown Snapdragon SoC '{self.soc}'", f"use one of {', '.join(SOCS)}")
        bad = [g for g in self.qnn_graphs if g not in QNN_GRAPHS]
        if bad or not self.qnn_graphs:
            raise VlmExportError(f"--qnn-graphs must name some of {', '.join(QNN_GRAPHS)} (got {', '.join(bad) or 'none'})",
                                 "pass e.g. --qnn-graphs vision")
        if not 0 < self.prefill_chunk <= self.max_context:
            raise VlmExportError("the prefill chunk must be positive and fit the KV buffer", "adjust --prefill-chunk / --max-context")


# What each variant is (for `build --help`; the module docstring has the detail).
VARIANT_SUMMARY = {"qnn": "vision and decoder QDQ (u16 activations, u8 weights) compiled to QNN context binaries "
                          "for the Hexagon NPU", "cpu-int8": "XNNPACK/CPU: vision int8 QDQ, decoder 8-bit weights, .ort models",
                   "cpu-int4": "XNNPACK/CPU: vision int8 QDQ, decoder 4-bit weights, .ort models"}


def cli_help() -> dict[str, str]:
    """`build --help` text per Profile field, from this target's own tables and defaults."""
    d = Profile()
    socs = " | ".join(f"{k} ({v['device']}, HTP v{v['htp_arch']})" for k, v in SOCS.items())
    return {
        "variants": f"comma-separated subset of {','.join(VARIANTS)} (default {','.join(d.variants)}): "
                    + "; ".join(f"{k} = {VARIANT_SUMMARY[k]}" for k in VARIANTS),
        "soc": f"Snapdragon SoC the QNN context binaries are compiled for: {socs} (default {d.soc})",
        "qnn_graphs": f"graphs put on the NPU, subset of {','.join(QNN_GRAPHS)} (default {','.join(d.qnn_graphs)}; "
                      "the others run on the CPU)",
        "max_context": f"KV buffer of the static graphs (default {d.max_context}, at most the model's context)",
        "prefill_chunk": f"prompt tokens per static prefill call (default {d.prefill_chunk})",
        "calibration": "folder (recipe.json, images/, prompts.txt) the QNN and CPU variants are calibrated on "
                       "(default: the repository's calibration/)",
        "eval_tokens": f"eval-prose tokens each variant is scored on against fp32 (default {d.eval_tokens})",
    }


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _static_graphs(graphs: Path, out: Path, profile: Profile) -> dict:
    from vlm_export.targets.assemble import export_layout

    exported = export_layout(graphs, out, layout=Layout.STATIC, kv_buffer=profile.max_context,
                             prefill_chunk=profile.prefill_chunk, static_batch=1)
    return {"graph_files": [g["file"] for g in exported["graphs"]], "kv_buffer": profile.max_context,
            "prefill_chunk": profile.prefill_chunk}


def _inplace_graphs(graphs: Path, out: Path) -> dict:
    from vlm_export.targets.assemble import export_layout

    exported = export_layout(graphs, out, layout=Layout.INPLACE)
    return {"graph_files": [g["file"] for g in exported["graphs"]]}


def _shipped(relative: Path, variant: str) -> bool:
    """What goes onto the phone: the CPU variants ship their `.ort` models (mobile/) in place of the
    `.onnx` graphs (kept for diffs here); the tokenizer graph stays `.onnx` everywhere."""
    if variant == "qnn" or relative.parts[0] in ("mobile", "tokenizer") or relative.name == "tokenizer.onnx":
        return True
    return not (relative.name.endswith(".onnx") or relative.name.endswith(".onnx.data"))


def _build_variant(name: str, graphs: Path, out: Path, staging: Path, profile: Profile) -> dict:
    started = time.perf_counter()
    if name == "fp32-static":
        record = _static_graphs(graphs, out, profile)
    elif name == "fp32-inplace":
        record = _inplace_graphs(graphs, out)
    elif name == "qnn":
        from vlm_export.targets.sd888.qnn_variant import build_qnn_variant

        source = staging / "fp32-static" if "decoder" in profile.qnn_graphs else graphs
        record = build_qnn_variant(source, out, profile)
    else:
        from vlm_export.targets.sd888.cpu_variant import build_cpu_variant

        record = build_cpu_variant(staging / "fp32-inplace", out, name, profile)
    record["seconds"] = round(time.perf_counter() - started, 1)
    files = [f for f in out.rglob("*") if f.is_file()]
    record["bytes"] = sum(f.stat().st_size for f in files)
    if name not in SOURCES:  # the fp32 sources stay here
        record["phone_bytes"] = sum(f.stat().st_size for f in files if _shipped(f.relative_to(out), name))
    record["peak_rss_mb_so_far"] = _peak_rss_mb()
    return record


def qnn_available() -> bool:
    return importlib.util.find_spec("onnxruntime_qnn") is not None


def preflight(profile: Profile) -> None:
    """Calibration photos and prompts are needed by every variant: check them before any export."""
    from vlm_export.quantize.calibration import check_calibration

    check_calibration(profile.calibration)


def build(graphs: Path, out: Path, profile: Profile, force: bool = False) -> dict:
    preflight(profile)
    manifest = verify(graphs)
    if any(g["attrs"].get("layout") == Layout.STATIC for g in manifest["graphs"] if g["wrapper"] == GraphRole.DECODER):
        raise VlmExportError("the sd888 target builds from dynamic-layout graphs (it makes its own static ones)",
                             "export with --layout dynamic")
    context = manifest["model"]["llm"]["max_context"]
    if profile.max_context > context:
        profile = dataclasses.replace(profile, max_context=context, prefill_chunk=min(profile.prefill_chunk, context))
    qnn_missing = "qnn" in profile.variants and not qnn_available()
    static_needed = "qnn" in profile.variants and not qnn_missing and "decoder" in profile.qnn_graphs
    inplace_needed = any(v.startswith("cpu-") for v in profile.variants)
    stages = (["fp32-static"] if static_needed else []) + (["fp32-inplace"] if inplace_needed else []) + \
        [v for v in profile.variants if not (v == "qnn" and qnn_missing)]
    report = {"target": "sd888", "soc": profile.soc, **SOCS[profile.soc], "variants": {}}
    with atomic_directory(out, force) as staging:
        for name in stages:
            key = stage_key(manifest["files"], name, dataclasses.asdict(profile), RECIPE_VERSION)
            record = staging.cached(name, key)
            if record is None:
                shutil.rmtree(staging.path / name, ignore_errors=True)  # leftovers of an interrupted attempt
                with stage(f"building {name}"):
                    record = _build_variant(name, graphs, staging.path / name, staging.path, profile)
                staging.remember(name, key, [f"{name}/{MANIFEST}"], record)
            report["variants"][name] = record
        if qnn_missing:
            report["variants"]["qnn"] = {"built": False, "reason": str(MissingExtraError(
                "onnxruntime_qnn", "qnn", "the QNN (Hexagon NPU) variant"))}
        report["memory"] = phone_fit(report, manifest["model"], profile.max_context)
        report["peak_rss_mb"] = _peak_rss_mb()
        built = [v for v in report["variants"] if report["variants"][v].get("built", True)]
        report["message"] = f"built {', '.join(built)}; run one with: vlm-export run {out}/<variant> --prompt ..."
        staging.finish()
        write_json_atomic(staging.path / "report.json", report)
        (staging.path / "report.md").write_text(report_markdown(report))
    if qnn_missing:  # the CPU variants are in place; the build as asked is not complete
        raise MissingExtraError("onnxruntime_qnn", "qnn", f"the CPU variants are in {out}, but the QNN (Hexagon NPU) variant")
    return report
