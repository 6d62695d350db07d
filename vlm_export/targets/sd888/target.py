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
import time
from pathlib import Path

from vlm_export.artifacts import verify
from vlm_export.errors import MissingExtraError, VlmExportError
from vlm_export.runtime.runners.qnn_ep import SOCS
from vlm_export.spec.graph_io import GraphRole, Layout
from vlm_export.spec.layouts import graph_layout
from vlm_export.targets.build_loop import build_stages
from vlm_export.targets.recipe import Recipe
from vlm_export.targets.sd888.profile import QNN_QDQ, RECIPES, Profile
from vlm_export.targets.sd888.report import phone_fit, report_markdown

RECIPE_VERSION = 3  # part of the build-cache key: bump when a variant is made differently


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _fp32_graphs(graphs: Path, out: Path, recipe: Recipe, profile: Profile) -> dict:
    """A source stage: the model of `graphs` exported again in the recipe's layout (fixed shapes
    for the static one: batch 1, the profile's prefill chunk and KV buffer)."""
    from vlm_export.targets.assemble import export_layout

    fixed = {"kv_buffer": profile.max_context, "prefill_chunk": profile.prefill_chunk} if recipe.layout == Layout.STATIC else {}
    exported = export_layout(graphs, out, layout=recipe.layout, **fixed, **({"static_batch": 1} if fixed else {}))
    record = {"graph_files": [g["file"] for g in exported["graphs"]], **fixed}
    if recipe.layout == Layout.STATIC:
        record["kv_prefix"] = _write_kv_prefix(out)
    return record


def _write_kv_prefix(static: Path) -> dict | None:
    """The chat template's first token as a KV prefix of the static graphs (runtime/kv_prefix.py),
    when every templated prompt starts with the same token; its K/V come from these fp32 graphs, so
    the fp32 stage and the variants made from it run the same function. None when prompts differ there."""
    import numpy as np

    from vlm_export.artifacts import read_manifest, write_manifest
    from vlm_export.progress import step
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator, Request
    from vlm_export.runtime.kv_prefix import compute_prefix

    step("KV prefix: the template's first token in fp32")
    with Generator(ArtifactSet.open(static, check_hashes=False)) as generator:
        firsts = [generator.encode(Request.ask(text), None)[0][:1] for text in ("Hi.", "What is in the picture?")]
        if not np.array_equal(*firsts):
            return None
        record = compute_prefix(generator, firsts[0]).save(static)
    manifest = read_manifest(static)
    write_manifest(static, {**{k: v for k, v in manifest.items() if k != "files"}, "kv_prefix": record})
    return record


def _shipped(relative: Path, recipe: Recipe) -> bool:
    """What goes onto the phone: the CPU variants ship their `.ort` models (mobile/) in place of the
    `.onnx` graphs (kept for diffs here); the tokenizer graph stays `.onnx` everywhere."""
    if "QNNExecutionProvider" in recipe.providers or relative.parts[0] in ("mobile", "tokenizer") or relative.name == "tokenizer.onnx":
        return True
    return not (relative.name.endswith(".onnx") or relative.name.endswith(".onnx.data"))


def _build_variant(recipe: Recipe, graphs: Path, staging: Path, profile: Profile) -> dict:
    """One stage: a source stage re-exported, or a variant by its passes (QNN or XNNPACK/CPU)."""
    started = time.perf_counter()
    out = staging / recipe.name
    source = graphs if recipe.source is None else staging / recipe.source
    if not recipe.passes:
        record = _fp32_graphs(graphs, out, recipe, profile)
    elif any(p.name == QNN_QDQ for p in recipe.passes):
        from vlm_export.targets.sd888.qnn_variant import build_qnn_variant

        record = build_qnn_variant(source, out, recipe, profile)
    else:
        from vlm_export.targets.sd888.cpu_variant import build_cpu_variant

        record = build_cpu_variant(source, out, recipe, profile)
    record["seconds"] = round(time.perf_counter() - started, 1)
    files = [f for f in out.rglob("*") if f.is_file()]
    record["bytes"] = sum(f.stat().st_size for f in files)
    if recipe.shipped:  # the fp32 sources stay here
        record["phone_bytes"] = sum(f.stat().st_size for f in files if _shipped(f.relative_to(out), recipe))
    record["peak_rss_mb_so_far"] = _peak_rss_mb()
    return record


def qnn_available() -> bool:
    return importlib.util.find_spec("onnxruntime_qnn") is not None


def preflight(profile: Profile) -> None:
    """Calibration photos and prompts are needed by every variant: check them before any export."""
    from vlm_export.quantize.calibration import check_calibration

    check_calibration(profile.calibration)


def recipes_for(profile: Profile, qnn_here: bool) -> list[Recipe]:
    """The stages a build runs: each variant's source stage first, then the variants, with the
    profile's choices applied (--qnn-graphs: only those graphs get the QNN pass; without the
    decoder on the NPU the QNN variant is made from the exported graphs, not a static copy)."""
    variants = []
    for name in profile.variants:
        recipe = RECIPES[name]
        if name == "qnn":
            if not qnn_here:
                continue
            passes = tuple(p for p in recipe.passes if p.role in profile.qnn_graphs)
            on_npu = GraphRole.DECODER in profile.qnn_graphs
            recipe = dataclasses.replace(recipe, passes=passes, source=recipe.source if on_npu else None,
                                         layout=recipe.layout if on_npu else None)
        variants.append(recipe)
    sources = [RECIPES[name] for name in RECIPES if any(v.source == name for v in variants)]
    return sources + variants


def graphs_layouts(profile: Profile) -> tuple[str, ...]:
    """The decoder layout this target builds from (build.py's ensure_graphs): dynamic (it exports
    its own static and inplace sources; the QNN variant with vision alone on the NPU keeps it)."""
    return (Layout.DYNAMIC,)


def build(graphs: Path, out: Path, profile: Profile, force: bool = False) -> dict:
    preflight(profile)
    manifest = verify(graphs)
    if any(graph_layout(g).name == Layout.STATIC for g in manifest["graphs"] if g["wrapper"] == GraphRole.DECODER):
        raise VlmExportError("the sd888 target builds from dynamic-layout graphs (it makes its own static ones)",
                             "export with --layout dynamic")
    context = manifest["model"]["llm"]["max_context"]
    if profile.max_context > context:
        profile = dataclasses.replace(profile, max_context=context, prefill_chunk=min(profile.prefill_chunk, context))
    qnn_missing = "qnn" in profile.variants and not qnn_available()
    report = {"target": "sd888", "soc": profile.soc, **SOCS[profile.soc]}

    def finish(report: dict, staging: Path) -> None:
        if qnn_missing:
            report["variants"]["qnn"] = {"built": False, "reason": str(MissingExtraError(
                "onnxruntime_qnn", "qnn", "the QNN (Hexagon NPU) variant"))}
        report["memory"] = phone_fit(report, manifest["model"], profile.max_context)
        report["peak_rss_mb"] = _peak_rss_mb()
        built = [v for v in report["variants"] if report["variants"][v].get("built", True)]
        report["message"] = f"built {', '.join(built)}; run one with: vlm-export run {out}/<variant> --prompt ..."

    build_stages(manifest, out, force, recipes_for(profile, not qnn_missing), report,
                 lambda recipe, staging: _build_variant(recipe, graphs, staging, profile),
                 lambda recipe: (dataclasses.asdict(profile), RECIPE_VERSION), report_markdown, finish)
    if qnn_missing:  # the CPU variants are in place; the build as asked is not complete
        raise MissingExtraError("onnxruntime_qnn", "qnn", f"the CPU variants are in {out}, but the QNN (Hexagon NPU) variant")
    return report
