"""The XNNPACK / CPU variants: what the phone's CPU runs when the NPU is not used.

Vision: int8 QDQ with uint8 activations and per-channel int8 weights, the form of XNNPACK's
QLinearConv (its only quantized matrix kernel in ONNX Runtime; the QDQ MatMuls run as the CPU EP's
QLinearMatMul). Decoder: the inplace layout (GroupQueryAttention writing K/V into the buffer the
runtime binds as past and present) with MatMulNBits 8- or 4-bit weights, as `--target cpu`.
"""

from __future__ import annotations

from pathlib import Path

from vlm_export.artifacts import verify, write_json_atomic, write_manifest
from vlm_export.diff.output_agreement import graph_accuracy
from vlm_export.progress import stage
from vlm_export.quality import table
from vlm_export.quantize.qdq_int8 import quantize_int8_qdq
from vlm_export.quantize.weight_only import quantize_weights, source_blocks
from vlm_export.spec.graph_io import GraphRole
from vlm_export.targets.assemble import assemble_variant
from vlm_export.targets.cpu.target import weight_config
from vlm_export.targets.sd888.mobile_format import convert_to_ort
from vlm_export.targets.sd888.xnnpack_partition import partition_report


def _vision_accuracy(fp32: Path, variant: Path, file: str, samples: list[dict]) -> dict:
    import onnxruntime as ort

    cpu = ["CPUExecutionProvider"]
    return graph_accuracy(ort.InferenceSession(str(fp32 / file), providers=cpu),
                          ort.InferenceSession(str(variant / file), providers=cpu), samples)


def build_cpu_variant(graphs: Path, out: Path, recipe, profile) -> dict:
    """`graphs`: the fp32 inplace set (fp32-inplace/), the variant's source and accuracy reference;
    `recipe` (targets/recipe.py): its precision picks the decoder's weight format."""
    from vlm_export.diff.end_to_end import EVAL_DIR, accuracy_vs_fp32
    from vlm_export.quality.eval_set import eval_tokens_for, random_llm
    from vlm_export.quantize.calibration import calibration_set, vision_samples
    from vlm_export.runtime.artifact_set import ArtifactSet

    manifest = verify(graphs)
    spec = ArtifactSet.open(graphs, check_hashes=False).spec
    images, _ = calibration_set(profile.calibration)
    samples = vision_samples(images, spec)
    held_out = vision_samples(sorted(EVAL_DIR.glob("*.jpg"))[:1] or images[:1], spec)
    name = recipe.name
    config = weight_config(str(recipe.precision))  # the cpu target's formats
    rewrites = {GraphRole.VISION: lambda g, src, dst: quantize_int8_qdq(src, dst / g["file"], samples, uint8_activations=True),
                GraphRole.DECODER: lambda g, src, dst: quantize_weights(src, dst / g["file"], config, source_blocks(manifest["model"]))}
    with stage(f"assembling {name} (vision int8 QDQ, decoder MatMulNBits {config.bits}-bit)"):
        built = assemble_variant(graphs, out, manifest, rewrites, target="sd888", variant=name)
    graph_files = [g["file"] for g in built["graphs"]]
    with stage(f"{name}: ORT format, reduced-operator config and XNNPACK partition"):
        mobile = convert_to_ort(out, graph_files, out / "mobile")
        partition = partition_report(out, graph_files)
    write_json_atomic(out / "xnnpack_partition.json", partition)
    body = {k: v for k, v in built.items() if k != "files"}
    write_manifest(out, {**body, "mobile": mobile})
    vision_file = next(g["file"] for g in built["graphs"] if g["wrapper"] == GraphRole.VISION)
    tokens = eval_tokens_for(profile.eval_tokens, manifest["model"])
    with stage(f"measuring {name} against fp32 ({tokens} eval tokens)"):
        accuracy = accuracy_vs_fp32(graphs, out, tokens)
    judged = None if random_llm(manifest["model"]) else table.verdict(accuracy, recipe.budget)  # random weights: not judged
    return {"graphs": built["rewrites"], "mobile": mobile,
            "xnnpack": {g["graph"]: f"{g['xnnpack_nodes']}/{g['nodes']} nodes" for g in partition["graphs"]},
            "vision_accuracy_vs_fp32": _vision_accuracy(graphs, out, vision_file, held_out),
            "accuracy_vs_fp32": accuracy, "quality_budget": judged.to_dict() if judged else None}
