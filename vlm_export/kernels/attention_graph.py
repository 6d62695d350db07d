"""Moves an inplace decoder's attention onto vlm-export's kernel (kernels/attention.c).

`com.microsoft.GroupQueryAttention` nodes that use exactly the form the kernel implements (packed
q|k|v, rotary inside in the half-split form, float32 caches, default scale, no local window, no
softcap, no quantized cache) become `vlm_export.cpu.GroupQueryAttention` with the same inputs,
outputs and head attributes; any other form is left to ONNX Runtime. The contract both follow is
model/gqa.py's; tests/test_attention_kernel.py holds the kernel to ONNX Runtime's op.
"""

from __future__ import annotations

import onnx
from onnx import helper

from vlm_export.kernels.library import DOMAIN

ORT_DOMAIN = "com.microsoft"
# Attributes the kernel implements, with the only values it implements (None: any value).
TAKEN = {"num_heads": None, "kv_num_heads": None, "do_rotary": 1, "rotary_interleaved": 0}


def kernel_takes(node: onnx.NodeProto, float_inputs: set[str]) -> bool:
    """Whether `node` is a GroupQueryAttention in the form the kernel implements. `float_inputs`:
    the names of the graph's float32 tensors (the caches must be among them)."""
    if node.op_type != "GroupQueryAttention" or node.domain != ORT_DOMAIN:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * (9 - len(node.input))
    packed = not inputs[1] and not inputs[2]
    return (packed and len(node.input) <= 9 and set(attrs) <= set(TAKEN)
            and all(attrs.get(name, value) == value for name, value in TAKEN.items() if value is not None)
            and attrs.get("do_rotary") == 1  # absent means 0 (no rotary) to ORT: required, not defaulted
            and inputs[3] in float_inputs and inputs[4] in float_inputs)


def use_attention_kernel(model: onnx.ModelProto) -> int:
    """Rewrites `model` in place; returns the number of attention nodes moved to the kernel. The
    caller ships the kernel library and names it in the graph's manifest record."""
    float_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    moved = 0
    for node in model.graph.node:
        if kernel_takes(node, float_inputs):
            node.domain = DOMAIN
            moved += 1
    if moved and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return moved

