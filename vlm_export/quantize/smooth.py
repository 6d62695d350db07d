"""SmoothQuant (Xiao et al., 2023, arXiv 2211.10438): move activation outliers into the weights
before int8 quantization, where per-channel weight scales can hold them.

LLaMA's RMSNorm output feeds q/k/v (input_layernorm) and gate/up (post_attention_layernorm). A few of its
channels carry values tens of times larger than the rest, and one per-tensor int8 activation scale
then leaves the other channels a handful of codes. Per input channel j of such a group:

    s_j = max|X_j| ** alpha / max_k(max|W_k[j, :]|) ** (1 - alpha)        (the paper's eq. 4)
    RMSNorm weight_j /= s_j,   W_k[j, :] *= s_j   for every MatMul k reading the norm

The float graph computes the same function (up to rounding); only where the range sits changes.
alpha = 0.5 is the paper's default for LLaMA-class models. Activation maxima come from the same
calibration feeds the quantizer uses. The final norm feeds lm_head, which stays float (qdq_int8.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from vlm_export.errors import VlmExportError

ALPHA = 0.5
MIN_SCALE = 1e-5


def norm_groups(model: onnx.ModelProto, skip: tuple[str, ...]) -> list[tuple[onnx.NodeProto, int, list[onnx.NodeProto]]]:
    """(norm weight Mul, index of its weight input, the MatMuls reading its output) per RMSNorm whose
    every MatMul reader has a 2-D weight initializer and none is named in `skip`."""
    initializers = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    groups = []
    for node in model.graph.node:
        if node.op_type != "Mul" or "norm" not in node.name:
            continue
        weight = next((i for i, name in enumerate(node.input) if name in initializers and len(initializers[name].dims) == 1), None)
        matmuls = [r for r in readers.get(node.output[0], []) if r.op_type == "MatMul"]
        others = [r for r in readers.get(node.output[0], []) if r.op_type not in ("MatMul", "Shape")]
        if weight is None or not matmuls or others or any(p in m.name for m in matmuls for p in skip):
            continue
        if all(m.input[0] == node.output[0] and m.input[1] in initializers and len(initializers[m.input[1]].dims) == 2
               for m in matmuls):
            groups.append((node, weight, matmuls))
    return groups


@dataclass
class ChannelStatistics:
    """Per-channel statistics of one activation over calibration feeds (C = its last axis)."""

    maximum: np.ndarray  # (C,) float32, max |x|
    mean_abs: np.ndarray  # (C,) float32, mean |x| over every row
    rows: np.ndarray  # (R, C) float32, up to `keep_rows` rows drawn evenly at random from every feed


def channel_statistics(path: Path, outputs: list[str], samples: list[dict], keep_rows: int = 0, seed: int = 0) -> dict[str, ChannelStatistics]:
    """Run the graph at `path` on `samples` (feed dicts) with `outputs` exposed and return each one's
    per-channel statistics (the last axis is the channel)."""
    import onnxruntime as ort

    if not outputs:
        return {}
    model = onnx.load(str(path), load_external_data=False)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs)
    probe = path.with_name(path.stem + ".probe.onnx")  # beside the source, so its external data resolves
    rng = np.random.default_rng(seed)
    per_feed = -(-keep_rows // max(len(samples), 1))
    maxima: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    kept: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    count = 0
    try:
        onnx.save_model(model, str(probe))
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        for feed in samples:
            for name, value in zip(outputs, session.run(outputs, feed)):
                rows = np.abs(value.reshape(-1, value.shape[-1]))
                maxima[name] = np.maximum(maxima.get(name, 0), rows.max(axis=0))
                sums[name] = sums.get(name, 0) + rows.sum(axis=0, dtype=np.float64)
                if per_feed:
                    pick = rng.choice(len(rows), size=min(per_feed, len(rows)), replace=False)
                    kept[name].append(value.reshape(-1, value.shape[-1])[np.sort(pick)].astype(np.float32))
            count += int(np.prod(value.shape[:-1]))
    finally:
        probe.unlink(missing_ok=True)
    return {name: ChannelStatistics(maxima[name].astype(np.float32), (sums[name] / max(count, 1)).astype(np.float32),
                                    np.concatenate(kept[name])[:keep_rows] if kept[name] else np.zeros((0, len(maxima[name])), np.float32))
            for name in outputs}


def fold_scales(model: onnx.ModelProto, group: tuple[onnx.NodeProto, int, list[onnx.NodeProto]], scale: np.ndarray) -> None:
    """Divide the group's RMSNorm weight by `scale` (C,) and multiply the rows (input channels) of
    every MatMul weight reading it: the float graph computes the same function. New initializers,
    because the exporter shares one tensor between norms whose weights are equal."""
    mul, weight_index, matmuls = group
    initializers = {i.name: i for i in model.graph.initializer}
    norm = numpy_helper.to_array(initializers[mul.input[weight_index]])
    name = f"{mul.name}/scaled_weight"
    model.graph.initializer.append(numpy_helper.from_array((norm / scale).astype(np.float32), name))
    mul.input[weight_index] = name
    for matmul in matmuls:
        w = numpy_helper.to_array(initializers[matmul.input[1]])
        name = f"{matmul.name}/scaled_weight"
        model.graph.initializer.append(numpy_helper.from_array((w * scale[:, None]).astype(np.float32), name))
        matmul.input[1] = name


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def smooth_quant(source: Path, destination: Path, samples: list[dict], skip: tuple[str, ...] = (), alpha: float = ALPHA) -> dict:
    """Write `source` (a float32 decoder graph) to `destination` with SmoothQuant's scales folded into
    each RMSNorm weight and the MatMul weights that read it. `samples`: calibration feed dicts of the
    graph. `skip`: name fragments of MatMuls left alone (with their norm). Returns what was done.
    Raises VlmExportError when `samples` is empty."""
    if not samples:
        raise VlmExportError(f"no calibration samples to smooth {source.name}", "check the calibration folder")
    model = onnx.load(str(source))
    groups = norm_groups(model, skip)
    stats = channel_statistics(source, [mul.output[0] for mul, _, _ in groups], samples)
    initializers = {i.name: i for i in model.graph.initializer}
    ratios = []
    for group in groups:
        mul, _, matmuls = group
        weights = [numpy_helper.to_array(initializers[m.input[1]]) for m in matmuls]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        act_max = stats[mul.output[0]].maximum
        scale = np.where((act_max > 0) & (weight_max > 0),
                         act_max ** alpha / np.maximum(weight_max, 1e-12) ** (1 - alpha), 1.0).clip(MIN_SCALE)
        ratios.append(float(act_max.max() / max(np.median(act_max), 1e-12)))
        fold_scales(model, group, scale)
    drop_unused_initializers(model)
    onnx.save_model(model, str(destination), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=destination.name + ".data", size_threshold=1024)
    return {"smoothquant_alpha": alpha, "smoothed_norms": len(groups),
            "smoothed_matmuls": sum(len(m) for _, _, m in groups),
            "outlier_ratio_max": round(max(ratios), 1) if ratios else None}
