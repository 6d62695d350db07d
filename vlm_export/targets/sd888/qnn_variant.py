"""The QNN (Hexagon HTP) variant: static fp32 graphs -> QDQ for the HTP -> context binaries.

Context binaries use embed mode 0: the compiled graph lives in a `<graph>_ctx_qnn.bin` beside a
small `<graph>_ctx.onnx` that points at it. The phone memory-maps the binary instead of parsing it
out of a protobuf, and a decoder binary may exceed protobuf's 2 GB limit (mode 1 embeds it).

Placement is proved, not estimated: each binary is compiled by an ONNX Runtime session with the
CPU fallback disabled, which fails unless every node of the graph is on the HTP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from vlm_export.artifacts import binary_soc, check_binary, link_or_copy, remove_tree, verify, write_manifest
from vlm_export.diff.output_agreement import graph_accuracy
from vlm_export.progress import stage
from vlm_export.quality import table
from vlm_export.runtime.runners import qnn_ep
from vlm_export.spec.graph_io import GraphRole
from vlm_export.targets.assemble import assemble_variant

EMBED_MODE = 0
# The end-to-end check runs the generation loop on the variant's QDQ graphs with ONNX Runtime's CPU EP: the
# emulated HTP takes ~12 s per smol decode step (CPU EP 0.1-0.2 s) and agrees with the CPU EP per graph
# (held-out decode logits cosine 0.9992-0.9996 on the HTP, 0.9995-0.9999 on the CPU EP), which the per-graph
# check in the report measures on the HTP itself for every build.
SIMULATED = "simulated (ONNX Runtime's CPU EP on the QDQ graphs the context binaries are compiled from)"
CPU_BY_DESIGN = {
    "embed": "embedding lookup of a prompt of any length: one Gather on a float table, which has no HTP v68 kernel "
             "and needs no NPU (it reads one row per token)",
    "decoder": "kept on the CPU by --qnn-graphs",
    "vision": "kept on the CPU by --qnn-graphs",
}


# New tokens each calibration request answers while its feeds are recorded: the decode graph is
# calibrated on those steps. Some tokens grow massive activations mid-answer (smol: a held-out step
# put 40.7 into block 2's down_proj input, whose calibrated range from 3 tokens per request was 1.7),
# and a 16-bit range that never saw one clips it. Measured on smol (CPU EP on the QDQ decode graph,
# fp32 prefill, 256 eval tokens, RMSNorms fused): 3 tokens top-1 0.789 / KL 0.257, 16 tokens 0.926 /
# 0.032. About 47 MB of K/V per recorded step on smol (98 steps).
DECODE_CALIBRATION_TOKENS = 16


def _fixed_inputs(graph: dict) -> None:
    for tensor in graph["inputs"] + graph["outputs"]:
        tensor["shape"] = [1 if isinstance(d, str) else d for d in tensor["shape"]]  # batch 1 on the NPU


def _qnn_rewrite(profile, samples: dict, held_out: dict, simulation: Path):
    from vlm_export.quantize.qnn_qdq import (
        RANGE_MARGIN,
        fix_dims,
        matmuls_as_conv,
        quantize_for_qnn,
        rmsnorms_fused,
        widen_ranges,
    )

    def rewrite(graph: dict, source: Path, out: Path) -> dict:
        import onnxruntime as ort

        name = graph["name"]
        work = out / f".work-{name}"
        work.mkdir(parents=True, exist_ok=True)
        try:
            fixed = work / f"{name}.fixed.onnx"
            fix_dims(source, fixed, {"batch": 1})
            convs, norms, feeds = 0, 0, samples[name]
            if graph["wrapper"] == GraphRole.DECODER:  # per-channel weights need the Conv form on the HTP
                shaped = work / f"{name}.conv.onnx"
                convs = matmuls_as_conv(fixed, shaped)
                norms = rmsnorms_fused(shaped, shaped)
                fixed = shaped  # every prefill chunk, padded ones too (spec/layouts/static.py: padding rows stay in range)
            qdq = work / f"{name}.qdq.onnx"
            with stage(f"quantizing {name} for the HTP (QDQ u16/u8, {len(feeds)} calibration samples)"):
                info = quantize_for_qnn(fixed, qdq, feeds, profile.qnn_16bit_weights)
                widened = widen_ranges(qdq) if graph["wrapper"] == GraphRole.DECODER else 0
            nodes = len(onnx.load(str(qdq), load_external_data=False).graph.node)
            kept = simulation / source.name  # for the end-to-end check (SIMULATED), under the graph's own name
            if qdq.with_name(qdq.name + ".data").exists():
                onnx.save(onnx.load(str(qdq)), str(kept), save_as_external_data=True, location=kept.name + ".data")
            else:
                shutil.copyfile(qdq, kept)
            context = out / f"{Path(graph['file']).stem}_ctx.onnx"
            with stage(f"compiling {name} for {profile.soc} (all {nodes} nodes on the HTP, CPU fallback off)"):
                qnn_ep.create_session(qdq, profile.soc, context_file=context, embed_mode=EMBED_MODE)
                binary = next(p.name for p in out.glob(f"{context.stem}*.bin"))
                check_binary(out / binary, profile.soc)
            with stage(f"measuring {name} on the emulated HTP against fp32 ({len(held_out[name])} held-out samples)"):
                compiled = qnn_ep.create_session(context, profile.soc)
                reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
                accuracy = graph_accuracy(reference, compiled, held_out[name])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        soc = binary_soc(out / binary)
        graph.update(file=context.name, qnn={"soc": profile.soc, "htp_arch": soc[1], "context_binary": binary,
                                             "embed_mode": EMBED_MODE})
        _fixed_inputs(graph)
        return {**info, "matmuls_as_conv": convs, "rmsnorms_fused": norms,
                "ranges_widened": {"tensors": widened, "factor": RANGE_MARGIN} if widened else None, "placement": {"nodes": nodes, "on_qnn": nodes, "cpu_fallback": "disabled"},
                "context_binary_bytes": (out / binary).stat().st_size, "accuracy_vs_fp32": accuracy}

    return rewrite


def build_qnn_variant(static: Path, out: Path, recipe, profile) -> dict:
    """`static`: the fp32 graphs the variant is made from (static layout when the decoder goes onto
    the NPU; any layout when only the vision graph does); `recipe` (targets/recipe.py): its passes
    name the graphs that go onto the HTP."""
    from vlm_export.diff.end_to_end import EVAL_DIR, accuracy_vs_fp32, eval_requests
    from vlm_export.quality.eval_set import eval_tokens_for, random_llm
    from vlm_export.quantize.calibration import calibration_requests, calibration_set, recorded_samples, vision_samples
    from vlm_export.runtime.artifact_set import ArtifactSet

    qnn_ep.qnn_module()  # a clear error before any work when the extra is absent
    manifest = verify(static)
    spec = ArtifactSet.open(static, check_hashes=False).spec
    images, prompts = calibration_set(profile.calibration)
    eval_images = sorted(EVAL_DIR.glob("*.jpg"))[:1] or images[:1]
    samples, held_out = {}, {}
    on_npu = {p.role for p in recipe.passes}
    if GraphRole.DECODER in on_npu:
        with stage("recording calibration and held-out feeds on the fp32 static graphs"):
            samples = recorded_samples(static, calibration_requests(images, prompts), new_tokens=DECODE_CALIBRATION_TOKENS)
            held_out = recorded_samples(static, eval_requests(), new_tokens=4)
    samples["vision"] = vision_samples(images, spec)  # every photo, as the recipe says
    held_out["vision"] = vision_samples(eval_images, spec)
    simulation = out.parent / f".{out.name}-qdq"  # the QDQ graphs as an artifact set, removed below
    simulation.mkdir(parents=True, exist_ok=True)
    try:
        rewrite = _qnn_rewrite(profile, samples, held_out, simulation)
        built = assemble_variant(static, out, manifest, {role: rewrite for role in on_npu},
                                 target="sd888", variant=recipe.name, soc=profile.soc)
        on_cpu = {g["file"]: CPU_BY_DESIGN[g["wrapper"]] for g in built["graphs"] if not g.get("qnn")}
        tokens = eval_tokens_for(profile.eval_tokens, manifest["model"])
        with stage(f"measuring qnn against fp32 ({tokens} eval tokens; generation loop on the QDQ graphs, CPU EP: simulated)"):
            for item in static.rglob("*"):
                target = simulation / item.relative_to(static)
                if item.is_file() and not target.exists() and item.name != "manifest.json":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(item, target)
            write_manifest(simulation, {k: v for k, v in manifest.items() if k != "files"})
            accuracy = {**accuracy_vs_fp32(static, simulation, tokens), "measured_on": SIMULATED}
    finally:
        remove_tree(simulation)
    judged = None if random_llm(manifest["model"]) else table.verdict(accuracy, recipe.budget)  # random weights: not judged
    return {"graphs": built["rewrites"], "on_cpu": on_cpu, "soc": profile.soc,
            "accuracy_vs_fp32": accuracy, "quality_budget": judged.to_dict() if judged else None}
