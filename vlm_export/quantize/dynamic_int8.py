"""Dynamic int8 for the vision tower on CPUs: MatMul weights int8 per output channel, activations
quantized per call from their own range (DynamicQuantizeLinear -> MatMulInteger), so nothing is
calibrated and no range goes stale on an image unlike the calibration set.

Why: the vision encoder is compute bound (~0.4 TFLOP per 336 px image for ViT-L/14), and fp32 on
this project's 2-core Xeon cannot get below ~1 s; int8 runs MLAS's u8s8 kernels (AVX-512 VNNI / AMX
where the CPU has them). Measured at the 1.7B preset's tower: 3.7x faster than the fp32 graph in
ONNX Runtime, image-embedding cosine 0.9998 vs fp32 (random weights; a real CLIP's activation
outliers may cost more -- the build report measures it on the eval image for every build).

The graph is exactly what `onnxruntime.quantization.quantize_dynamic(per_channel=True,
weight_type=QInt8, op_types_to_quantize=["MatMul"])` writes (ORT 1.2x; the same nodes, names and
weight codes: tests/test_dynamic_int8.py compares the two), made here because ORT's quantizer
quantizes a per-channel weight one column at a time in Python: ~25 s for smol's CLIP-L tower, ~0.5 s
vectorised. For each MatMul whose B is a float initializer of rank 2 (the others stay float):

    A -> DynamicQuantizeLinear -> A_q (uint8), A_scale, A_zero_point     (one per distinct A)
    MatMulInteger(A_q, B_q int8 (K, N), A_zero_point, B_zero_point int8 zeros (N,)) -> int32
    -> Cast(float) -> Mul(., A_scale * B_scale (N,)) -> the MatMul's output

with B's codes symmetric per output column: scale = max|column| / 127 (ORT's compute_scale_zp:
the range made to include 0 and symmetric, its width over 254), codes round-half-even(B / scale).
ORT's graph optimizer fuses the chain into DynamicQuantizeMatMul when it loads the graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

log = logging.getLogger(__name__)
SCHEME = "dynamic int8 (per-channel s8 weights, per-call u8 activations)"


def per_channel_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float32 -> (codes int8 (K, N), scale float32 (N,)), symmetric per column (axis 1) as ORT's
    per-channel QInt8 weights: scale = (2 max(|min(col, 0)|, max(col, 0))) / 254 in float64, stored
    as float32 (1.0 where that underflows float32); codes = clip(round(B / scale), -128, 127)."""
    weight = np.asarray(weight, dtype=np.float32)
    low, high = np.minimum(weight.min(axis=0), 0), np.maximum(weight.max(axis=0), 0)
    exact = 2 * np.maximum(np.abs(low), np.abs(high)).astype(np.float64) / 254.0
    scale = np.where(exact < np.finfo(np.float32).tiny, 1.0, exact).astype(np.float32)
    codes = np.clip(np.round(weight / scale), -128, 127).astype(np.int8)
    return codes, scale


def quantize_dynamic_int8(source: Path, destination: Path) -> dict:
    """Rewrite `source`'s constant-weight MatMuls to dynamic int8 (module docstring) into `destination`.

    Weights as above; graph inputs, outputs and every other node unchanged. Returns the manifest
    record (scheme, how many MatMuls went to int8 and how many stayed float).

    The source's weights are read over a memory map (onnx_wire.py), not parsed into a proto: onnx.load
    took 2.5 s and 1.2 GB for smol's CLIP-L, whose float MatMul weights are only read to be quantized."""
    from vlm_export.onnx_wire import read_without_weights, skipped_arrays

    model, skipped = read_without_weights(Path(source))
    arrays = skipped_arrays(Path(source), model, skipped)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}

    def value(tensor) -> np.ndarray:
        return arrays[tensor.name] if tensor.name in arrays else numpy_helper.to_array(tensor, str(Path(source).parent))

    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # A -> (A_quantized, A_scale, A_zero_point)
    weights: dict[str, tuple[str, str, str]] = {}  # B -> (B_quantized, B_scale, B_zero_point)
    nodes, new_initializers, dropped = [], [], set()
    for node in graph.node:
        b = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if b is None or len(b.dims) != 2 or b.data_type != TensorProto.FLOAT:
            nodes.append(node)
            continue
        a, out = node.input[0], node.output[0]
        if a not in quantized_inputs:
            quantized_inputs[a] = (f"{a}_quantized", f"{a}_scale", f"{a}_zero_point")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(quantized_inputs[a]), name=f"{a}_QuantizeLinear"))
        if b.name not in weights:
            codes, scale = per_channel_int8(value(b))
            weights[b.name] = (f"{b.name}_quantized", f"{b.name}_scale", f"{b.name}_zero_point")
            new_initializers += [numpy_helper.from_array(codes, weights[b.name][0]), numpy_helper.from_array(scale, weights[b.name][1]),
                                 numpy_helper.from_array(np.zeros(scale.shape, np.int8), weights[b.name][2])]
            dropped.add(b.name)
        a_q, a_scale, a_zero = quantized_inputs[a]
        b_q, b_scale, b_zero = weights[b.name]
        base = node.name or out
        integer, as_float, scales = f"{out}_output_quantized", f"{out}_output_quantized_cast_output", f"{base}_quant_scales_mul:0"
        nodes += [helper.make_node("MatMulInteger", [a_q, b_q, a_zero, b_zero], [integer], name=f"{base}_quant"),
                  helper.make_node("Cast", [integer], [as_float], name=f"{out}_output_quantized_cast", to=TensorProto.FLOAT),
                  helper.make_node("Mul", [a_scale, b_scale], [scales], name=f"{base}_quant_scales_mul"),
                  helper.make_node("Mul", [as_float, scales], [out], name=f"{base}_quant_output_scale_mul")]
    still_used = {name for n in nodes for name in n.input}
    kept = [t for t in graph.initializer if t.name not in dropped or t.name in still_used]
    for tensor in kept:  # the float weights the int8 graph keeps: their bytes back in the proto
        if tensor.name in arrays:
            tensor.raw_data = arrays[tensor.name].tobytes()
        elif tensor.data_location == TensorProto.EXTERNAL:  # the int8 graph is one file wherever its source's data lay
            load_external_data_for_tensor(tensor, str(Path(source).parent))
            tensor.ClearField("data_location")
            tensor.ClearField("external_data")
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    model.producer_name = "vlm-export dynamic int8"
    onnx.save_model(model, str(destination))
    counts = {op: sum(n.op_type == op for n in nodes) for op in ("MatMulInteger", "MatMul")}
    log.info("%s: %d MatMuls in int8, %d left in float", Path(source).name, counts["MatMulInteger"], counts["MatMul"])
    return {"scheme": SCHEME, "matmul_integer": counts["MatMulInteger"], "matmul_float": counts["MatMul"]}
