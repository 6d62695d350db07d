"""Fewer, larger ops in the exported LLaMA block: a decode step runs ~400 tiny ops on 576-wide
vectors, and ONNX Runtime's fixed cost per op (~3-10 us) was a third of a smol int4 step.

- `fuse_rms_norms`: the exporter's RMSNorm (Pow, ReduceMean, Add eps, Sqrt, Div, Mul, Mul weight)
  -> `SimplifiedLayerNormalization`; where its input is a residual Add, both -> com.microsoft
  `SkipSimplifiedLayerNormalization`, whose 4th output is the sum the next residual reads. ORT's
  own optimizer fuses the norm but not the Add: the sum has two readers (its SkipLayerNormFusion
  takes single-reader Adds only), which is every pre-norm residual.
- `fuse_swiglu`: `chunk(2)` of the fused gate|up projection, silu and the product (Slice, Slice,
  Sigmoid, Mul, Mul) -> the kernel matmul's `swiglu=1` epilogue (kernels/int4_matmul.c).

Each match is exact on the exporter's pattern (constants read and checked), anything else is
left as it is; tests/test_fusions.py compares the graphs' outputs before and after.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vlm_export.kernels.attention_graph import ORT_DOMAIN
from vlm_export.quantize.matmul_kernel import OPS


class _Graph:
    """Producers, readers and constant values of a graph, for pattern matching."""

    def __init__(self, model: onnx.ModelProto):
        # inline initializers only (the small constants patterns check); external ones are weights
        self.constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                          if t.data_location != onnx.TensorProto.EXTERNAL}
        self.weight_ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        for node in model.graph.node:  # Constant nodes, as the exporter sometimes writes them
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.readers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in model.graph.output}

    def only_reader(self, name: str, op_type: str):
        """The single node reading `name`, if it is an `op_type` and `name` is no graph output."""
        readers = self.readers.get(name, [])
        if len(readers) == 1 and readers[0].op_type == op_type and name not in self.outputs:
            return readers[0]
        return None

    def constant(self, name: str, value: float) -> bool:
        found = self.constants.get(name)
        return found is not None and found.size == 1 and float(found.reshape(-1)[0]) == value

    def other(self, node, name: str) -> str | None:
        """The input of a two-input `node` that is not `name`."""
        if len(node.input) == 2 and name in node.input:
            return node.input[1] if node.input[0] == name else node.input[0]
        return None


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _last_axis(g: _Graph, node, axes_input: int) -> bool:
    axes = _attrs(node).get("axes")
    if axes is None and len(node.input) > axes_input and node.input[axes_input]:
        axes = g.constants.get(node.input[axes_input])
    return axes is not None and [int(a) for a in np.asarray(axes).reshape(-1)] in ([-1], [2])


def _rms_norm_at(g: _Graph, power) -> tuple[list, str, str, float] | None:
    """(nodes, x, weight, epsilon) of the RMSNorm starting at `power`, or None."""
    x = power.input[0]
    if not g.constant(power.input[1], 2.0):
        return None
    mean = g.only_reader(power.output[0], "ReduceMean")
    if mean is None or not _last_axis(g, mean, 1) or _attrs(mean).get("keepdims", 1) != 1:
        return None
    add = g.only_reader(mean.output[0], "Add")
    eps_name = add and g.other(add, mean.output[0])
    eps = g.constants.get(eps_name) if eps_name else None
    if eps is None or eps.size != 1:
        return None
    sqrt = g.only_reader(add.output[0], "Sqrt")
    div = sqrt and g.only_reader(sqrt.output[0], "Div")
    if div is None or div.input[1] != sqrt.output[0] or not g.constant(div.input[0], 1.0):
        return None
    scale = g.only_reader(div.output[0], "Mul")
    if scale is None or g.other(scale, div.output[0]) != x:
        return None
    times_weight = g.only_reader(scale.output[0], "Mul")
    weight = times_weight and g.other(times_weight, scale.output[0])
    if weight is None or g.weight_ranks.get(weight) != 1:
        return None
    return [power, mean, add, sqrt, div, scale, times_weight], x, weight, float(eps.reshape(-1)[0])


def fuse_rms_norms(model: onnx.ModelProto) -> dict:
    """Rewrites `model` in place -> {"rms_norms": fused norms, "skip_rms_norms": of them with their residual Add}."""
    g = _Graph(model)
    dropped, added, norms, skips = set(), [], 0, 0
    for power in [n for n in model.graph.node if n.op_type == "Pow"]:
        found = _rms_norm_at(g, power)
        if found is None:
            continue
        nodes, x, weight, eps = found
        out = nodes[-1].output[0]
        residual = g.producer.get(x)
        summands = residual is not None and residual.op_type == "Add" and len(residual.input) == 2 and \
            not any(i in g.weight_ranks or i in g.constants for i in residual.input) and residual.name not in dropped
        if summands:  # the sum keeps its other readers through the fused op's 4th output
            node = helper.make_node("SkipSimplifiedLayerNormalization", [*residual.input, weight], [out, "", "", x],
                                    name=nodes[-1].name + "/skip_rms_norm", domain=ORT_DOMAIN, epsilon=eps)
            dropped.add(residual.name)
            skips += 1
        else:
            node = helper.make_node("SimplifiedLayerNormalization", [x, weight], [out], name=nodes[-1].name + "/rms_norm",
                                    axis=-1, epsilon=eps, stash_type=1)
        dropped.update(n.name for n in nodes)
        added.append((nodes[-1].name, node))
        norms += 1
    _replace(model, dropped, dict(added))
    if skips and not any(o.domain == ORT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    return {"rms_norms": norms, "skip_rms_norms": skips}


def _slice_of(g: _Graph, node, start: int, end: int, open_end: bool) -> bool:
    """Whether `node` is Slice(data, [start], [end], last axis, step 1); `open_end`: any end >= `end`
    (the exporter writes the width, or INT64_MAX, for a slice to the end)."""
    inputs = list(node.input) + [""] * (5 - len(node.input))
    starts, ends = g.constants.get(inputs[1]), g.constants.get(inputs[2])
    steps = g.constants.get(inputs[4]) if inputs[4] else np.array([1])
    if starts is None or ends is None or steps is None or not _last_axis(g, node, 3):
        return False
    if starts.reshape(-1).tolist() != [start] or steps.reshape(-1).tolist() != [1] or ends.size != 1:
        return False
    stop = int(ends.reshape(-1)[0])
    return stop >= end if open_end else stop == end


def fuse_swiglu(model: onnx.ModelProto) -> int:
    """Rewrites `model` in place; returns the number of kernel matmuls that took their MLP activation."""
    from vlm_export.kernels.library import DOMAIN

    g = _Graph(model)
    dropped, fused = set(), 0
    for matmul in [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in OPS.values()]:
        width = _attrs(matmul).get("N", 0)
        readers = g.readers.get(matmul.output[0], [])
        if width % 2 or len(readers) != 2 or any(r.op_type != "Slice" for r in readers) or matmul.output[0] in g.outputs:
            continue
        half = width // 2
        gate = next((r for r in readers if _silu_of(g, r)), None)
        up = next((r for r in readers if r is not gate), None)
        if gate is None or not _slice_of(g, gate, 0, half, False) or not _slice_of(g, up, half, width, True):
            continue
        sigmoid, silu = _silu_of(g, gate)
        product = g.only_reader(up.output[0], "Mul")
        if product is None or g.other(product, up.output[0]) != silu.output[0] or g.only_reader(silu.output[0], "Mul") is not product:
            continue
        matmul.attribute.append(helper.make_attribute("swiglu", 1))
        matmul.output[0] = product.output[0]
        dropped.update(n.name for n in (gate, up, sigmoid, silu, product))
        fused += 1
    _replace(model, dropped, {})
    return fused


def _silu_of(g: _Graph, node):
    """(Sigmoid, Mul) when `node`'s output is read by exactly a Sigmoid and a Mul of (it, that
    Sigmoid) -- silu -- else None."""
    readers = g.readers.get(node.output[0], [])
    if len(readers) != 2 or node.output[0] in g.outputs:
        return None
    sigmoid = next((r for r in readers if r.op_type == "Sigmoid"), None)
    silu = next((r for r in readers if r.op_type == "Mul"), None)
    if sigmoid is None or silu is None or g.other(silu, node.output[0]) != sigmoid.output[0] \
            or g.only_reader(sigmoid.output[0], "Mul") is not silu:
        return None
    return sigmoid, silu


def _replace(model: onnx.ModelProto, dropped: set[str], added: dict[str, onnx.NodeProto]) -> None:
    """Drops the `dropped` nodes, puts each `added` node where the node named by its key was, then
    restores topological order (a fused op may now write a tensor that an earlier node read)."""
    if not dropped:
        return
    nodes = [added.get(n.name, n) for n in model.graph.node if n.name in added or n.name not in dropped]
    produced = {o for n in nodes for o in n.output if o}
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, waiting = [], list(nodes)
    while waiting:
        still = []
        for node in waiting:
            if all(i in ready or i not in produced for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                still.append(node)
        if len(still) == len(waiting):
            raise ValueError("fusion left a cycle in the graph")
        waiting = still
    del model.graph.node[:]
    model.graph.node.extend(ordered)
