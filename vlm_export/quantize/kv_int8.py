"""int8 KV cache for the inplace decoder.

ONNX Runtime's GroupQueryAttention (CPU, 1.31+) keeps K/V as int8 with a fixed scale per (kv head,
channel) (`k_quant_type` / `v_quant_type` = PER_CHANNEL, `kv_cache_bit_width` 8): it quantizes
each new token's K/V as it writes them into the shared buffer (round, clip) and dequantizes as it
attends. A decode step reads the whole cache, and int8 reads a quarter of fp32's bytes: measured at
the 1.4B shape on 2 cores, the 24 attention ops at context 1024 take 8.2 ms instead of 17.5
(PER_TENSOR 6.7 ms, but one scale per layer lets an outlier channel flatten all the others).

The scales come from the fp32 graphs' own K/V (after rotary, as stored) over the calibration
prompts and images: the absolute maximum per (head, channel), with a margin for decode-time
values beyond what the prompts showed (those clip).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MARGIN = 1.2
QMAX = 127
SCALE_INPUTS = 12  # GroupQueryAttention's k_scale is input 12, v_scale input 13


def calibrate_kv_scales(fp32_dir: Path, images: list[Path], prompts: list[str]) -> dict[str, np.ndarray]:
    """past_key_values.{i}.key|value -> (num_kv_heads, head_dim) fp32 scales, from prefills on the fp32 set."""
    from vlm_export.quantize.calibration import calibration_requests
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator

    absmax: dict[str, np.ndarray] = {}
    with Generator(ArtifactSet.open(fp32_dir, check_hashes=False), "ort") as generator:
        for request in calibration_requests(images, prompts):
            image = generator.image_embeds(request.image) if request.image is not None else None
            embeds, _ = generator.encode(request, image)
            session = generator.start([embeds], 1)
            lengths = session.positions
            for name, buffer in session.cache.values.items():  # (1, nkv, capacity, hd), valid up to lengths[0]
                seen = np.abs(buffer[0, :, : int(lengths[0])]).max(axis=1)
                absmax[name] = np.maximum(absmax.get(name, 0.0), seen)
    return {name: np.maximum(value * MARGIN / QMAX, 1e-8).astype(np.float32) for name, value in absmax.items()}


def quantize_kv_cache(path: Path, scales: dict[str, np.ndarray], record: dict) -> dict:
    """Rewrites the inplace decoder at `path` (weights untouched: its data file stays as it is) so its
    K/V buffers are int8, and the manifest record's K/V tensors with it."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    int8 = set(scales) | {name.replace("past_key_values.", "present.", 1) for name in scales}
    for value in list(graph.input) + list(graph.output):
        if value.name in int8:
            value.type.tensor_type.elem_type = TensorProto.INT8
    layers = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        past_key, past_value = node.input[3], node.input[4]
        names = []
        for past in (past_key, past_value):
            scale = scales[past]
            names.append(f"{past}.scale")
            graph.initializer.append(numpy_helper.from_array(scale.reshape(1, *scale.shape[:1], 1, scale.shape[-1]), names[-1]))
        inputs = list(node.input)[:SCALE_INPUTS] + [""] * (SCALE_INPUTS - len(node.input))
        del node.input[:]
        node.input.extend(inputs + names)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        layers += 1
    if layers * 2 != len(scales):
        raise ValueError(f"{path}: {layers} GroupQueryAttention nodes for {len(scales)} K/V scales")
    onnx.save(model, str(path))  # external data keeps its location: the weights are not rewritten
    for tensor in record["inputs"] + record["outputs"]:
        if tensor["name"] in int8:
            tensor["dtype"] = "int8"
    return {"kv_cache": "int8 per (head, channel)", "kv_scale_margin": MARGIN, "kv_layers": layers}
