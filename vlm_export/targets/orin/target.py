"""The orin target: graphs -> per-precision variant (fp16 | int8 QDQ) -> static check -> plan ->
engines (if TensorRT is here) or a build script. Every variant is a complete artifact set.

    fp16/  fp16 graphs from the exporter (validated against the fp32 reference), TensorRT fp16 flag
    int8/  vision and decoder with explicit symmetric int8 Q/DQ (calibrated on calibration/),
           built with int8 + fp16 flags; its accuracy against fp32 is measured here in ONNX Runtime
    int4/  decoder weights int4 weight-only (blocked DequantizeLinear-21, block 32, lm_head float),
           activations fp16; measured against fp32 in ONNX Runtime like int8
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_export.artifacts import MANIFEST, atomic_directory, link_or_copy, stage_key, verify, write_json_atomic, write_manifest
from vlm_export.errors import VlmExportError
from vlm_export.progress import stage, step
from vlm_export.quality import table
from vlm_export.spec.graph_io import GraphRole, Layout
from vlm_export.targets.orin.plan import COMPUTE_CAPABILITY, DEVICES, polygraphy_command, profiles_for, trtexec_command
from vlm_export.targets.orin.static_check import check_graph

PRECISIONS = {"fp16": ["fp16"], "int8": ["int8", "fp16"], "int4": ["fp16"]}  # builder flags per variant
# The quality budget each variant is held to (quality/metrics.py BUDGETS): shown, never failing the build.
QUALITY_BUDGET = {"fp16": "gpu-fp16", "int8": "gpu-int8", "int4": "gpu-int4"}
# What each variant's graphs are (for `build --help`; the flags above are what TensorRT is given).
VARIANT_GRAPHS = {"fp16": "fp16 export", "int8": "vision and decoder int8 Q/DQ, calibrated",
                  "int4": "decoder weights int4 weight-only, activations fp16"}
QUANTIZED_GRAPHS = ("vision", "decoder")  # the token-embedding gather stays float
VARIANT_RECIPE_VERSION = 2  # part of the build-cache key: bump when a variant is made differently


@dataclass(frozen=True)
class Profile:
    device: str = "agx-orin-64gb"
    variants: tuple[str, ...] = ("fp16", "int8", "int4")
    max_batch: int = 1
    max_prompt: int = 512
    max_context: int = 1024
    vision_on_dla: bool = False
    calibration: str | None = None  # folder with recipe.json (default: the repository's calibration/)
    eval_tokens: int = 16

    def __post_init__(self):
        if self.device not in DEVICES:
            raise VlmExportError(f"unknown Orin device '{self.device}'", f"use one of {', '.join(DEVICES)}")
        unknown = [p for p in self.variants if p not in PRECISIONS]
        if unknown:
            raise VlmExportError(f"unknown orin precision(s) {', '.join(unknown)}", f"use {', '.join(PRECISIONS)}")
        if self.vision_on_dla and DEVICES[self.device]["dla_cores"] == 0:
            raise VlmExportError(f"{self.device} has no DLA core", "drop --dla or pick a module with DLA")
        if not 0 < self.max_prompt < self.max_context:
            raise VlmExportError("max prompt must be positive and below max context", "adjust --max-prompt / --max-context")


def cli_help() -> dict[str, str]:
    """`build --help` text per Profile field, from this target's own tables and defaults."""
    d = Profile()
    variants = "; ".join(f"{k} = {VARIANT_GRAPHS[k]}, TensorRT flags {'+'.join(f)}" for k, f in PRECISIONS.items())
    devices = " | ".join(f"{k} ({v['memory_gb']} GB, {v['dla_cores']} DLA)" for k, v in DEVICES.items())
    return {
        "variants": f"comma-separated subset of {','.join(PRECISIONS)} (default {','.join(d.variants)}): {variants}",
        "device": f"Jetson module the plans are sized for: {devices} (default {d.device})",
        "vision_on_dla": f"vision graph on DLA core 0, GPU fallback (default {'on' if d.vision_on_dla else 'off'})",
        "max_prompt": f"longest prompt in tokens the prefill profile takes (default {d.max_prompt})",
        "max_context": f"KV cache length the decode profile takes (default {d.max_context}, at most the model's context)",
        "calibration": "folder (recipe.json, images/, prompts.txt) the int8 variant is calibrated on "
                       "(default: the repository's calibration/)",
        "eval_tokens": f"eval-prose tokens each variant is scored on against fp32 (default {d.eval_tokens})",
    }


def graph_plan(graph: dict, profile: Profile, precision: str) -> dict:
    device = DEVICES[profile.device]
    return {
        "graph": graph["file"], "engine": Path(graph["file"]).stem + ".engine",
        "precisions": PRECISIONS[precision], "workspace_mb": device["workspace_mb"], "timing_cache": "timing.cache",
        "compute_capability": COMPUTE_CAPABILITY, "device": profile.device,
        "dla_core": 0 if profile.vision_on_dla and graph["wrapper"] == GraphRole.VISION else None,
        "profiles": profiles_for(graph, profile.max_batch, profile.max_prompt, profile.max_context),
    }


def build_script(plans: list[dict]) -> str:
    lines = ["#!/usr/bin/env bash", "# Build the TensorRT engines on the Jetson (JetPack 6 / TensorRT 10), in this folder.",
             "# Generated by vlm-export; every shape and flag comes from plan.json.", "set -euo pipefail",
             'cd "$(dirname "$0")"', 'if command -v trtexec >/dev/null; then']
    lines += [f"  {trtexec_command(p['graph'], p['engine'], p)}" for p in plans]
    lines += ["else", "  # no trtexec on PATH: the same engines through Polygraphy (pip install polygraphy)"]
    lines += [f"  {polygraphy_command(p['graph'], p['engine'], p)}" for p in plans]
    lines += ["fi", ""]
    return "\n".join(lines)


def _build_engines(directory: Path, plans: list[dict]) -> dict:
    """In-process build through Polygraphy's loaders, where TensorRT is importable."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine
    from polygraphy.backend.trt import Profile as TrtProfile

    built = {}
    for plan in plans:
        profiles = []
        for p in plan["profiles"]:
            trt_profile = TrtProfile()
            for name, s in p["shapes"].items():
                trt_profile.add(name, s["min"], s["opt"], s["max"])
            profiles.append(trt_profile)
        config = CreateConfig(fp16="fp16" in plan["precisions"], int8="int8" in plan["precisions"], profiles=profiles,
                              memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan["workspace_mb"] << 20},
                              load_timing_cache=str(directory / plan["timing_cache"]))
        SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(str(directory / plan["graph"])), config=config),
                   str(directory / plan["engine"]))()
        import torch

        built[plan["engine"]] = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
                                 "compute_capability": ".".join(str(v) for v in torch.cuda.get_device_capability())}
    return built


def _fp16_graphs(out: Path, manifest: dict) -> dict:
    """fp16 graphs from the exporter (RMSNorm and softmax stay fp32 inside), validated against the fp32 reference."""
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec.graph_io import ExportOptions
    from vlm_export.spec.model_spec import spec_from_dict

    options = ExportOptions(**{**manifest["options"], "dtype": "fp16"})
    exported = export_model(spec_from_dict(manifest["model"]), out, options)
    return {g["file"]: {"dtype": "fp16", "validation": g["validation"]["outputs"]} for g in exported["graphs"]}


def _variant_graphs(graphs: Path, out: Path, precision: str, manifest: dict, profile: Profile) -> dict:
    """fp16: a fresh fp16 export. int8: the fp32 graphs, with vision and decoder replaced by calibrated Q/DQ graphs."""
    if precision == "fp16":
        return _fp16_graphs(out, manifest)
    if precision == "int4":
        from vlm_export.quantize.weight_only import quantize_weights_int4_qdq
        from vlm_export.targets.assemble import assemble_variant

        step("int4 weight-only: decoder")
        rewrites = {GraphRole.DECODER: lambda g, src, dst: quantize_weights_int4_qdq(src, dst / g["file"])}
        return assemble_variant(graphs, out, manifest, rewrites)["rewrites"]
    quantization = {}
    records = {g["file"]: g for g in manifest["graphs"]}
    samples = None
    for relative in manifest["files"]:
        record = records.get(relative)
        if precision == "int8" and record is not None and record["wrapper"] in QUANTIZED_GRAPHS:
            if samples is None:
                samples = _calibration_samples(graphs, manifest, profile)
            from vlm_export.quantize.qdq_int8 import quantize_int8_qdq

            step(f"int8 Q/DQ: {relative}")
            out.mkdir(parents=True, exist_ok=True)
            quantization[relative] = quantize_int8_qdq(graphs / relative, out / relative, samples[record["wrapper"]])
        elif not (precision == "int8" and relative.endswith(".data") and relative[: -len(".data")] in records
                  and records[relative[: -len(".data")]]["wrapper"] in QUANTIZED_GRAPHS):
            link_or_copy(graphs / relative, out / relative)
    return quantization


def _calibration_samples(graphs: Path, manifest: dict, profile: Profile) -> dict:
    from vlm_export.quantize.calibration import calibration_set, decoder_samples, vision_samples
    from vlm_export.runtime.artifact_set import ArtifactSet

    step("collecting calibration samples")
    spec = ArtifactSet.open(graphs, check_hashes=False).spec
    images, prompts = calibration_set(profile.calibration)
    return {"vision": vision_samples(images, spec),
            "decoder": decoder_samples(graphs, images, prompts)}


def _build_variant(graphs: Path, out: Path, precision: str, manifest: dict, profile: Profile) -> dict:
    started = time.perf_counter()
    quantization = _variant_graphs(graphs, out, precision, manifest, profile)
    variant_manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else manifest
    checks = [check_graph(out / g["file"]) for g in variant_manifest["graphs"]]
    failed = [f"{c['graph']}: {c['problems'][0]}" for c in checks if not c["passed"]]
    if failed:
        raise VlmExportError(f"graphs TensorRT cannot parse: {'; '.join(failed[:3])}", "re-export, or report the op")
    plans = [graph_plan(g, profile, precision) for g in variant_manifest["graphs"]]
    write_json_atomic(out / "plan.json", {"device": profile.device, **DEVICES[profile.device], "plans": plans})
    write_json_atomic(out / "static_check.json", {"checks": checks})
    script = out / "build_engines.sh"
    script.write_text(build_script(plans))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    engines = {}
    if importlib.util.find_spec("tensorrt") is not None:
        with stage(f"building TensorRT engines ({precision})"):
            engines = _build_engines(out, plans)
    body = {k: v for k, v in variant_manifest.items() if k != "files"}
    write_manifest(out, {**body, "kind": "vlm-export build", "target": "orin", "variant": precision,
                         "device": profile.device, "builder_flags": PRECISIONS[precision],
                         "quantization": quantization, "engines": engines})
    record = {"seconds": round(time.perf_counter() - started, 1), "engines_built": sorted(engines),
              "static_check": {c["graph"]: "ok" for c in checks}, "plans": len(plans),
              "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
    if precision in ("int8", "int4"):
        from vlm_export.diff.end_to_end import accuracy_vs_fp32

        with stage(f"measuring {precision} against fp32 in ONNX Runtime"):
            record["accuracy_vs_fp32"] = accuracy_vs_fp32(graphs, out, profile.eval_tokens)
        judged = table.verdict(record["accuracy_vs_fp32"], QUALITY_BUDGET[precision])
        record["quality_budget"] = judged.to_dict() if judged else None
    return record


def build(graphs: Path, out: Path, profile: Profile, force: bool = False) -> dict:
    manifest = verify(graphs)
    if any(g["attrs"].get("layout") == Layout.STATIC for g in manifest["graphs"] if g["wrapper"] == GraphRole.DECODER):
        raise VlmExportError("the orin target builds from dynamic-layout graphs (TensorRT profiles)", "export with --layout dynamic")
    context = manifest["model"]["llm"]["max_context"]
    if profile.max_context > context:  # the decode profile never needs more than the model's context
        profile = dataclasses.replace(profile, max_context=context, max_prompt=min(profile.max_prompt, context - 1))
    report = {"target": "orin", "device": profile.device, "variants": {}}
    with atomic_directory(out, force) as staging:
        for precision in profile.variants:
            key = stage_key(manifest["files"], precision, dataclasses.asdict(profile), VARIANT_RECIPE_VERSION)
            record = staging.cached(precision, key)
            if record is None:
                shutil.rmtree(staging.path / precision, ignore_errors=True)  # leftovers of an interrupted attempt
                with stage(f"building {precision}"):
                    record = _build_variant(graphs, staging.path / precision, precision, manifest, profile)
                staging.remember(precision, key, [f"{precision}/{MANIFEST}"], record)
            report["variants"][precision] = record
        built = [f"{p}/{e}" for p, r in report["variants"].items() for e in r["engines_built"]]
        report["message"] = ("engines built: " + ", ".join(built)) if built else (
            f"engines NOT built: TensorRT is not importable here; copy {out}/<variant> to the Jetson and run "
            "./build_engines.sh there")
        staging.finish()
        write_json_atomic(staging.path / "report.json", report)
        (staging.path / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    lines = [f"Jetson {report['device']} (compute capability {COMPUTE_CAPABILITY})", "",
             "| variant | size MB | TensorRT parser check | engines | " + " | ".join(table.HEADER) + " |",
             "|---|---|---|---|" + "---|" * len(table.HEADER)]
    for name, v in report["variants"].items():
        cells = table.cells(v.get("accuracy_vs_fp32"), QUALITY_BUDGET.get(name))
        checks = "ok" if all(s == "ok" for s in v["static_check"].values()) else "FAIL"
        lines.append(f"| {name} | {v['bytes'] / 1e6:.0f} | {checks} | {', '.join(v['engines_built']) or 'not built'} | " + " | ".join(cells) + " |")
    quality_note = table.note([v.get("accuracy_vs_fp32") for v in report["variants"].values()])
    return "\n".join(lines + (["", quality_note] if quality_note else [])) + "\n"
