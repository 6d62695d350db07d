"""Which nodes of a graph ONNX Runtime's XNNPACK EP would take, from its documented kernel support
(data/xnnpack_support.json, with its source). The stock x86 onnxruntime wheel has no XNNPACK EP,
so this is a static partition, not a run: the same graphs run here on the CPU EP.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx

SUPPORT = json.loads((Path(__file__).parent / "data" / "xnnpack_support.json").read_text())


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}
    ranks.update({i.name: len(i.dims) for i in model.graph.initializer})
    return ranks


def _float_supported(node, constants: set[str], ranks: dict[str, int]) -> bool:
    if node.op_type not in SUPPORT["float_ops"]:
        return False
    if node.op_type in SUPPORT["constant_weight_ops"] and (len(node.input) < 2 or node.input[1] not in constants):
        return False
    if node.op_type in SUPPORT["rank2_ops"]:
        return ranks.get(node.input[0], 99) <= 2 and ranks.get(node.input[1], 99) <= 2
    return True


def partition(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    ranks = _ranks(model)
    taken: set[int] = set()  # ids of node protos (quantizer-made nodes may share empty names)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # the weight of a QDQ group arrives through a DQ of a constant: look through it
        dq_inputs = [producer.get(i) for i in node.input if i]
        is_qdq = bool(dq_inputs) and all(p is not None and p.op_type == "DequantizeLinear" for p in dq_inputs[:1]) and \
            all(c.op_type == "QuantizeLinear" for o in node.output for c in consumers.get(o, []))
        if is_qdq and node.op_type in SUPPORT["qdq_ops"]:
            weights_const = node.op_type not in SUPPORT["constant_weight_ops"] or (
                len(dq_inputs) > 1 and dq_inputs[1] is not None and dq_inputs[1].input[0] in constants)
            if weights_const:
                taken.add(id(node))
                taken.update(id(p) for p in dq_inputs if p is not None)
                taken.update(id(c) for o in node.output for c in consumers.get(o, []))
            continue
        if not is_qdq and _float_supported(node, constants, ranks):
            taken.add(id(node))
            fused = [c for o in node.output for c in consumers.get(o, []) if c.op_type in SUPPORT["fused_activations"]]
            if node.op_type == "Conv":
                taken.update(id(c) for c in fused)
    nodes = list(model.graph.node)
    on_xnnpack = Counter(n.op_type for n in nodes if id(n) in taken)
    on_cpu = Counter(n.op_type for n in nodes if id(n) not in taken)
    return {"graph": path.name, "nodes": len(nodes), "xnnpack_nodes": sum(on_xnnpack.values()),
            "xnnpack_ops": dict(on_xnnpack.most_common()), "cpu_ops": dict(on_cpu.most_common())}


def partition_report(directory: Path, files: list[str]) -> dict:
    graphs = [partition(directory / f) for f in files]
    return {"execution_provider": "XnnpackExecutionProvider (static partition; not in the x86 onnxruntime wheel, "
                                  "so these graphs run here on the CPU EP)",
            "source": SUPPORT["source"], "graphs": graphs}
