"""Layer-wise localisation: every decoder block's attention output, MLP output and residual
stream, in the fp32 graph and in a candidate graph, on the same inputs (the effect of Polygraphy's
`--onnx-outputs mark all`, restricted to the tensors that map to blocks).

The first divergence is the first block whose residual-stream error jumps (> 10x the previous
block's and above 1e-4 relative); for quantized graphs, the blocks that add the most error are the
candidates for the mixed-precision list.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

BLOCK = re.compile(r"/blocks\.(\d+)/")
JUMP_FACTOR, FLOOR = 10.0, 1e-4


def block_tensors(model: onnx.ModelProto) -> dict[int, dict[str, str]]:
    """{block: {"attn_out", "mlp_out", "hidden"}} tensor names, from the exported node names."""
    points: dict[int, dict[str, str]] = {}
    first_norm_input: dict[int, str] = {}
    final_norm_input = None
    for node in model.graph.node:
        match = BLOCK.match(node.name)
        if match:
            block = int(match.group(1))
            if "/input_layernorm/" in node.name and block not in first_norm_input:
                first_norm_input[block] = node.input[0]
            if "/o_proj/" in node.name:
                points.setdefault(block, {})["attn_out"] = node.output[0]
            if "/down_proj/" in node.name:
                points.setdefault(block, {})["mlp_out"] = node.output[0]
        elif node.name.startswith("/norm/") and final_norm_input is None:
            final_norm_input = node.input[0]
    for block in points:
        points[block]["hidden"] = first_norm_input.get(block + 1, final_norm_input)
    return dict(sorted(points.items()))


def _session_with_outputs(path: Path, names: list[str], library: Path | None = None):
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    existing = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The proto is loaded without its weights; ORT reads them from the original folder.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    if library is not None:  # the variant's own kernels (custom ops)
        from vlm_export.runtime.runners.ort_runner import register_kernels

        register_kernels(options, library, None)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(reference.astype(np.float64) - candidate).max() / scale)


def localize(reference_path: Path, candidate_path: Path, feeds: list[dict], library: Path | None = None) -> dict:
    points = block_tensors(onnx.load(str(reference_path), load_external_data=False))
    names = [n for block in points.values() for n in block.values() if n]
    reference, candidate = _session_with_outputs(reference_path, names), _session_with_outputs(candidate_path, names, library)
    errors = {block: {k: 0.0 for k in tensors} for block, tensors in points.items()}
    for feed in feeds:
        ref_out = dict(zip(names, reference.run(names, feed)))
        cand_out = dict(zip(names, candidate.run(names, feed)))
        for block, tensors in points.items():
            for kind, name in tensors.items():
                errors[block][kind] = max(errors[block][kind], relative_error(ref_out[name], cand_out[name]))
    blocks = [{"block": b, **e} for b, e in errors.items()]
    first, previous = None, 0.0
    for entry in blocks:
        if entry["hidden"] > FLOOR and entry["hidden"] > JUMP_FACTOR * max(previous, 1e-7):
            first = entry["block"]
            break
        previous = entry["hidden"]
    added = sorted(blocks, key=lambda e: e["hidden"] - (errors.get(e["block"] - 1, {}).get("hidden", 0.0)), reverse=True)
    return {"blocks": blocks, "first_divergence": first, "costliest_blocks": [e["block"] for e in added[:3]]}
