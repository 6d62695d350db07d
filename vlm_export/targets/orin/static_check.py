"""Static check of ONNX graphs against TensorRT's ONNX parser support (kept as data with its source):
operators, domains, opset, tensor dtypes, and the restrictions that concern our graphs."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

SUPPORT = Path(__file__).resolve().parent / "data" / "tensorrt_onnx_support.json"


def load_support() -> dict:
    return json.loads(SUPPORT.read_text())


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    """Initializers, Constant outputs, and Q/DQ-quantized initializers (explicit-quantization weights)."""
    constants = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    return constants | dequantized


def _nonzero_zero_points(model: onnx.ModelProto) -> list[str]:
    """TensorRT takes symmetric Q/DQ only: every zero point must be 0."""
    from onnx import numpy_helper

    values = {i.name: i for i in model.graph.initializer}
    bad = []
    for node in model.graph.node:
        if (node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in values
                and numpy_helper.to_array(values[node.input[2]]).any()):
            bad.append(node.name)
    return bad


def _blocked_int4(model: onnx.ModelProto) -> bool:
    weights = {i.name: i.data_type for i in model.graph.initializer}
    return any(n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
               and weights.get(n.input[0]) == onnx.TensorProto.INT4 for n in model.graph.node)


def check_graph(path: Path, support: dict | None = None) -> dict:
    support = support or load_support()
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high = support["opset_range"]
    if _blocked_int4(model) and "int4_weight_only" in support:  # int4 weight-only needs DequantizeLinear-21
        high = max(high, support["int4_weight_only"]["opset"])
    if opset is None or not low <= opset <= high:
        problems.append(f"opset {opset} outside TensorRT {support['tensorrt']}'s {low}..{high}")
    supported, constants = set(support["supported"]), _initializer_names(model)
    op_counts: dict[str, int] = {}
    for node in model.graph.node:
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
        if node.domain not in support["domains"]:
            problems.append(f"{node.name}: custom-domain op {node.domain}.{node.op_type}")
        elif node.op_type not in supported:
            problems.append(f"{node.name}: {node.op_type} is not supported by the TensorRT ONNX parser")
        elif node.op_type == "Conv" and node.input[1] not in constants:
            problems.append(f"{node.name}: Conv weights must be an initializer")
        elif node.op_type == "Slice" and len(node.input) > 3 and node.input[3] and node.input[3] not in constants:
            problems.append(f"{node.name}: Slice axes must be an initializer")
    problems += [f"{name}: non-zero zero point (TensorRT needs symmetric int8)" for name in _nonzero_zero_points(model)]
    allowed = set(support["dtypes"])
    for value in [*model.graph.input, *model.graph.output]:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        if dtype not in allowed:
            problems.append(f"{value.name}: dtype {dtype} not supported")
    return {"graph": path.name, "opset": opset, "ops": dict(sorted(op_counts.items())), "problems": problems,
            "passed": not problems, "support_source": support["source"]}
