"""Layer-wise localisation: every decoder block's attention output, MLP output and residual
stream, in the fp32 graph and in a candidate graph, on the same inputs (the effect of Polygraphy's
`--onnx-outputs mark all`, restricted to the tensors that map to blocks).

The baseline is either another graph (`localize`: the fp32 graph vs a built variant) or the PyTorch
reference itself (`localize_against_torch`: the same tensors captured by hooks on the decoder module's
blocks). The first divergence is the first block whose residual-stream error jumps (> 10x the previous
block's and above 1e-4 relative), so a quantized graph's gradual drift names no block; the blocks
that add the most error are the candidates for the mixed-precision list.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import torch

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
    for block, tensors in points.items():
        tensors["hidden"] = first_norm_input.get(block + 1, final_norm_input)
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

        register_kernels(options, library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(reference.astype(np.float64) - candidate).max() / scale)


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    denominator = np.linalg.norm(ref) * np.linalg.norm(cand)
    return float(ref @ cand / denominator) if denominator else 1.0


def localize(reference_path: Path, candidate_path: Path, feeds: list[dict], library: Path | None = None,
             reduced_precision: bool = False) -> dict:
    points = block_tensors(onnx.load(str(reference_path), load_external_data=False))
    if not points:
        return not_localised("fp32 graph", f"{reference_path.name} has no /blocks.N/ node names to map tensors to decoder blocks")
    names = [n for block in points.values() for n in block.values() if n]
    reference, candidate = _session_with_outputs(reference_path, names), _session_with_outputs(candidate_path, names, library)
    errors = {block: {k: 0.0 for k in tensors} for block, tensors in points.items()}
    cosines = {block: 1.0 for block in points}
    for feed in feeds:
        ref_out = dict(zip(names, reference.run(names, feed)))
        cand_out = dict(zip(names, candidate.run(names, feed)))
        for block, tensors in points.items():
            for kind, name in tensors.items():
                errors[block][kind] = max(errors[block][kind], relative_error(ref_out[name], cand_out[name]))
            cosines[block] = min(cosines[block], cosine(ref_out[tensors["hidden"]], cand_out[tensors["hidden"]]))
    return {"baseline": "fp32 graph", **_verdict(errors, cosines, reduced_precision)}


def localize_against_torch(module: torch.nn.Module, graph, candidate_path: Path, feeds: list[dict],
                           library: Path | None = None, reduced_precision: bool = False) -> dict:
    """The candidate graph's block tensors vs the PyTorch reference's on the same feeds.

    `module` is the decoder graph's wrapper (model/graph_modules.py: `blocks`, `norm`) and `graph`
    its GraphSpec. The reference's tensors come from hooks, the graph's from extra ORT outputs."""
    points = block_tensors(onnx.load(str(candidate_path), load_external_data=False))
    blocks = getattr(module, "blocks", None)
    if not points:
        return not_localised("pytorch", f"{candidate_path.name} has no /blocks.N/ node names to map tensors to decoder blocks")
    if blocks is None or len(blocks) != len(points):
        return not_localised("pytorch", f"{candidate_path.name} has {len(points)} blocks, the PyTorch "
                             f"{graph.attrs.get('layout', '?')} decoder {len(blocks or [])}")
    names = [n for block in points.values() for n in block.values() if n]
    session = _session_with_outputs(candidate_path, names, library)
    errors = {block: {k: 0.0 for k in tensors} for block, tensors in points.items()}
    cosines = {block: 1.0 for block in points}
    for feed in feeds:
        captured = _torch_block_tensors(module, graph, feed)
        graph_out = dict(zip(names, session.run(names, feed)))
        for block, tensors in points.items():
            for kind, name in tensors.items():
                ours, theirs = captured[block].get(kind), graph_out.get(name)
                if ours is None or theirs is None or ours.shape != theirs.shape:
                    if kind == "hidden":  # the rule needs the residual stream; the rest is detail
                        return not_localised("pytorch", f"block {block}'s hidden state has shape {None if theirs is None else theirs.shape} "
                                             f"in {candidate_path.name}, {None if ours is None else ours.shape} in PyTorch")
                    errors[block][kind] = None
                    continue
                if errors[block][kind] is not None:
                    errors[block][kind] = max(errors[block][kind], relative_error(ours, theirs))
            cosines[block] = min(cosines[block], cosine(captured[block]["hidden"], graph_out[tensors["hidden"]]))
    return {"baseline": "pytorch", **_verdict(errors, cosines, reduced_precision)}


def _torch_block_tensors(module: torch.nn.Module, graph, feed: dict) -> dict[int, dict[str, np.ndarray]]:
    """{block: {"attn_out", "mlp_out", "hidden"}} from one reference run, mirroring `block_tensors`:
    a block's hidden state is its output, except the last block's, which is the final norm's input
    (what the graph exposes; a last-logits decoder has already cut it to the last row there)."""
    from vlm_export.diff.polygraphy_runners import TorchGraphRunner

    captured: dict[int, dict[str, np.ndarray]] = {b: {} for b in range(len(module.blocks))}

    def keep(block: int, kind: str, tensor: torch.Tensor) -> None:
        captured[block][kind] = tensor.detach().float().cpu().numpy()

    handles = [module.norm.register_forward_pre_hook(lambda _m, args: keep(len(module.blocks) - 1, "hidden", args[0]))]
    for index, block in enumerate(module.blocks):
        if index + 1 < len(module.blocks):
            handles.append(block.register_forward_hook(lambda _m, _a, out, i=index: keep(i, "hidden", out[0])))
        for name, sub in block.named_modules():
            kind = {"o_proj": "attn_out", "down_proj": "mlp_out"}.get(name.rsplit(".", 1)[-1])
            if kind:
                handles.append(sub.register_forward_hook(lambda _m, _a, out, i=index, k=kind: keep(i, k, out)))
    try:
        with TorchGraphRunner(module, graph) as runner:
            runner.infer(feed)
    finally:  # the hooked modules are the reference's own (shared with other graphs' wrappers)
        for handle in handles:
            handle.remove()
    return captured


def _verdict(errors: dict[int, dict[str, float | None]], cosines: dict[int, float], reduced_precision: bool) -> dict:
    """The first block whose residual-stream error jumps, and the three that add the most error.

    A reduced-precision graph (fp16, int8, int4) is off from its first block on by design, so there
    block 0 is a step change only against the median block's error, not against the exact input."""
    blocks = [{"block": b, **e, "hidden_cosine": cosines[b]} for b, e in errors.items()]
    first, previous = None, float(np.median([e["hidden"] for e in blocks])) if reduced_precision else 0.0
    for entry in blocks:
        if entry["hidden"] > FLOOR and entry["hidden"] > JUMP_FACTOR * max(previous, 1e-7):
            first = entry["block"]
            break
        previous = entry["hidden"]
    added = sorted(blocks, key=lambda e: e["hidden"] - (errors.get(e["block"] - 1, {}).get("hidden", 0.0)), reverse=True)
    return {"blocks": blocks, "first_divergence": first, "costliest_blocks": [e["block"] for e in added[:3]],
            "reduced_precision": reduced_precision}


def not_localised(baseline: str, reason: str) -> dict:
    return {"baseline": baseline, "blocks": [], "first_divergence": None, "costliest_blocks": [], "not_localised": reason}


def summary(loc: dict) -> str:
    """One line: where a graph first diverges from its baseline, or why no block is named."""
    against = "PyTorch" if loc.get("baseline") == "pytorch" else "the fp32 graph"
    if loc.get("not_localised"):
        return f"not localised against {against}: {loc['not_localised']}"
    first = loc["first_divergence"]
    if first is None:
        worst = max(e["hidden"] for e in loc["blocks"])
        return (f"no diverging block against {against} (hidden-state relative error at most {worst:.1e}, no step "
                f"change; costliest blocks {loc['costliest_blocks']})")
    entry = next(e for e in loc["blocks"] if e["block"] == first)
    if first > 0:
        jump = f"over {JUMP_FACTOR:g}x layer {first - 1}'s {loc['blocks'][first - 1]['hidden']:.1e}"
    elif loc.get("reduced_precision"):
        jump = f"over {JUMP_FACTOR:g}x the median block's {np.median([e['hidden'] for e in loc['blocks']]):.1e}"
    else:
        jump = f"over {FLOOR:g}"
    at_output = f"; cosine {entry['hidden_cosine']:.4f} at its output" if "hidden_cosine" in entry else ""
    return (f"first diverging block: decoder layer {first} against {against} (hidden-state relative error "
            f"{entry['hidden']:.1e}, {jump}{at_output})")
