"""The float32 islands of a decoder or vision graph, by node name, for TensorRT's per-layer precision.

With `--fp16`, TensorRT may run any layer in fp16, including the reductions that overflow there: the
RMSNorm's sum of squares, softmax over long rows, rotary angles at large positions (a known TensorRT
behaviour; its docs name normalization layers as the usual case). The fp16 variant's graphs state
their float32 islands themselves (the exporter casts them up), so that variant is built as a strongly
typed network, which keeps every tensor in the graph's own type. The int8 and int4 variants are float32
graphs with Q/DQ, built with `--fp16` for what is not quantized: their islands are pinned to fp32 by
name (`--precisionConstraints=obey --layerPrecisions=NAME:fp32,...`, the same in the in-process build).

Islands found here, structurally, in the exporter's graphs (model/graph_modules.py):
    RMSNorm  every node under an `*_layernorm/` or the final `/norm/` module scope; LayerNorm ops
    softmax  every Softmax node
    rotary   q*cos + rotate_half(q)*sin: the Add, its two Muls, the Concat, Neg and Slices of rotate_half
"""

from __future__ import annotations

import re
from pathlib import Path

NORM_SCOPE = re.compile(r"(^|/)(\w*layernorm|norm)/")  # the decoder's RMSNorm modules, decomposed
NORM_AND_SOFTMAX_OPS = ("Softmax", "LayerNormalization", "SimplifiedLayerNormalization")  # as single ops (vision's LayerNorm)


def float32_islands(model_path: Path) -> list[str]:
    """Names of the nodes of `model_path` (an ONNX file; weights not read) that must compute in fp32,
    in graph order. TensorRT's ONNX parser names each layer after its node."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    islands: set[str] = set()
    for node in graph.node:
        if node.op_type in NORM_AND_SOFTMAX_OPS or NORM_SCOPE.search(node.name):
            islands.add(node.name)
        elif node.op_type == "Add":
            islands.update(_rotary(node, producer))
    return [node.name for node in graph.node if node.name in islands]


def _rotary(add, producer: dict) -> list[str]:
    """The rotary nodes ending in `add` (x*cos + rotate_half(x)*sin), or [] if it is another Add."""
    muls = [producer.get(name) for name in add.input]
    if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
        return []
    for mul in muls:
        concat = next((producer[i] for i in mul.input if i in producer and producer[i].op_type == "Concat"), None)
        if concat is None:
            continue
        parts = [producer.get(i) for i in concat.input]
        neg = next((p for p in parts if p is not None and p.op_type == "Neg"), None)
        if neg is None:
            continue
        slices = [p for p in parts if p is not None and p.op_type == "Slice"]
        slices += [producer[i] for i in neg.input if i in producer and producer[i].op_type == "Slice"]
        return [add.name, *(m.name for m in muls), concat.name, neg.name, *(s.name for s in slices)]
    return []
