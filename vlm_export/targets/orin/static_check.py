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
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return {i.name for i in model.graph.initializer} | constants


def check_graph(path: Path, support: dict | None = None) -> dict:
    support = support or load_support()
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high = support["opset_range"]
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
    allowed = set(support["dtypes"])
    for value in [*model.graph.input, *model.graph.output]:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        if dtype not in allowed:
            problems.append(f"{value.name}: dtype {dtype} not supported")
    return {"graph": path.name, "opset": opset, "ops": dict(sorted(op_counts.items())), "problems": problems,
            "passed": not problems, "support_source": support["source"]}
