"""MatMulNBits (4- and 8-bit) -> `vlm_export.cpu::Int4MatMul` / `Int8MatMul`: same weights, repacked.

The values are not re-quantized: each weight keeps MatMulNBits' code, its block's scale and
minimum (-zero point x scale: the default 2^(bits-1), a uint8 or a float zero point), only their
order changes to the one kernels/int4_matmul.c streams (16 outputs per 64-byte line, then one line
of float16 scales and minimums per block). quantize/blocks.py stores every scale and minimum as a
float16 value, so the float16 copy here is exact for the graphs this project writes.
A node the kernel cannot take (g_idx, bias, K not a multiple of 32) stays MatMulNBits.

When K is not a multiple of the block (a width below 128, in small models), MatMulNBits pads the
last block with zeros; the kernel instead takes blocks of gcd(block, K) inputs, each carrying its
parent block's scale and minimum, which is the same matrix.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vlm_export.kernels.library import DOMAIN, ship_library

TILE = 16  # outputs per 64-byte line
OPS = {4: "Int4MatMul", 8: "Int8MatMul"}  # code width -> the kernel's op


def unpack_matmul_nbits(packed: np.ndarray, n: int, k: int, bits: int = 4) -> np.ndarray:
    """MatMulNBits' B (N, ceil(K/block), block * bits / 8) uint8 -> (N, K) codes: 4-bit two per byte
    (low nibble first), 8-bit one per byte."""
    packed = packed.reshape(n, -1)
    if bits == 8:
        return packed[:, :k]
    codes = np.empty((n, packed.shape[1] * 2), np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes[:, :k]


def minimums_of(scales: np.ndarray, zero_points: np.ndarray | None, n: int, blocks: int, bits: int = 4) -> np.ndarray:
    """MatMulNBits' zero points -> the blocks' minimums (N, blocks): m = -z * s. None = the
    symmetric default 2^(bits-1); uint8 = 4-bit zero points two per byte (low nibble first), 8-bit
    one per byte; float = as is."""
    scales = scales.reshape(n, blocks)
    if zero_points is None:
        z = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8 and bits == 8:
        z = zero_points.reshape(n, -1)[:, :blocks].astype(np.float32)
    elif zero_points.dtype == np.uint8:
        packed = zero_points.reshape(n, -1)
        z = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        z = zero_points.reshape(n, blocks).astype(np.float32)
    return (-z * scales).astype(np.float32)


def kernel_blocks(values: np.ndarray, n: int, k: int, block: int) -> tuple[np.ndarray, int]:
    """MatMulNBits' (N, ceil(K/block)) per-block values -> the kernel's (N, K/sub) and its block `sub`."""
    sub = math.gcd(block, k)
    per_block = np.repeat(values.reshape(n, -1), block // sub, axis=1)
    return per_block[:, : k // sub], sub


def exact_minimums(codes: np.ndarray, scales: np.ndarray, minimums: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, K) and per-block minimums (N, K/block) whose float16 copy is exact where it can be.

    The kernel keeps each block's minimum in float16. A block stored with an offset in its codes
    (a GGUF Q4_1 block widened to 8 bits holds q + 120 with minimum m - 120 d, where m and d are
    float16) has a minimum float16 cannot hold (~0.03 d off: measured KL 0.0044 instead of 0.0029 on
    smol's int8 variant). Shifting the block's codes down by their lowest value c and adding c d
    to the minimum is the same matrix; it is taken where it makes the minimum float16-exact and
    the unshifted one is not (a Q4_1 block always holds a code 0, so c undoes the offset)."""
    n, k = codes.shape
    grouped = codes.reshape(n, k // block, block)
    lowest = grouped.min(axis=-1)
    scales64, minimums64 = scales.astype(np.float64), minimums.astype(np.float64)
    shifted = minimums64 + lowest * scales64
    exact = lambda values: values.astype(np.float16).astype(np.float64) == values
    take = exact(shifted) & ~exact(minimums64)
    codes = (grouped - np.where(take, lowest, 0)[..., None].astype(grouped.dtype)).reshape(n, k)
    return codes, np.where(take, shifted, minimums64).astype(np.float32)


def repack(codes: np.ndarray, scales: np.ndarray, minimums: np.ndarray, block: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) codes and (N, K/block) scales and minimums -> the kernel's weight bytes and
    (tiles, K/block, 32) float16 parameters (16 scales, then 16 minimums).

    4-bit: line v of block b of tile t, byte 4c + i: low nibble = code[16t + c][b*block + 8v + i],
    high nibble = code[16t + c][b*block + 8v + 4 + i]. 8-bit: byte 4c + i = code[16t + c][b*block + 4v + i].
    Outputs past N (the last tile) get code 0, scale 0 and minimum 0: they compute zeros the kernel
    never stores.
    """
    n, k = codes.shape
    tiles, blocks = -(-n // TILE), k // block
    padded = np.zeros((tiles * TILE, k), np.uint8)
    padded[:n] = codes
    if bits == 8:  # (t, c, b, v, i) -> (t, b, v, c, i)
        weights = padded.reshape(tiles, TILE, blocks, block // 4, 4).transpose(0, 2, 3, 1, 4)
    else:  # (t, c, b, v, half, i) -> (t, b, v, c, i, half)
        lines = padded.reshape(tiles, TILE, blocks, block // 8, 2, 4).transpose(0, 2, 3, 1, 5, 4)
        weights = (lines[..., 0] | (lines[..., 1] << 4)).astype(np.uint8)
    params = np.zeros((tiles * TILE, blocks, 2), np.float16)
    params[:n, :, 0] = scales.reshape(n, blocks)
    params[:n, :, 1] = minimums.reshape(n, blocks)
    # (t, c, b, which) -> (t, b, which, c)
    params = params.reshape(tiles, TILE, blocks, 2).transpose(0, 2, 3, 1).reshape(tiles, blocks, 2 * TILE)
    return np.ascontiguousarray(weights).reshape(-1), np.ascontiguousarray(params)


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def kernel_takes(node: onnx.NodeProto) -> bool:
    attrs = _attributes(node)
    extra_inputs = [name for name in node.input[4:] if name]  # g_idx, bias; a zero point (input 3) is taken
    return (node.op_type == "MatMulNBits" and attrs.get("bits", 4) in OPS and not extra_inputs
            and math.gcd(attrs["block_size"], attrs["K"]) % 32 == 0)


def use_matmul_kernel(path: Path, record: dict, library: Path) -> dict:
    """Rewrites the graph at `path` in place (and its data file), ships `library` beside it and
    names it in the manifest `record` so the runtime registers it."""
    from vlm_export.quantize.weight_only import MINIMUMS

    model = onnx.load(str(path), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    dropped: set[str] = set()
    rewritten, kept = dict.fromkeys(OPS, 0), 0
    for node in model.graph.node:
        if not kernel_takes(node):
            kept += node.op_type == "MatMulNBits"
            continue
        attrs = _attributes(node)
        n, k = attrs["N"], attrs["K"]
        packed, scales = (numpy_helper.to_array(initializers.pop(name)) for name in node.input[1:3])
        zero_points = numpy_helper.to_array(initializers.pop(node.input[3])) if len(node.input) > 3 and node.input[3] else None
        blocks = -(-k // attrs["block_size"])
        bits = attrs.get("bits", 4)
        minimums = minimums_of(scales, zero_points, n, blocks, bits)
        add = by_name.get(node.name + MINIMUMS + "Add")
        if add is not None:  # weight_only.matmul_nbits' minimum term: folded into the kernel's minimums
            term = [by_name[node.name + MINIMUMS + part] for part in ("Reshape", "ReduceSum", "MatMul", "Add")]
            minimums = minimums + numpy_helper.to_array(initializers.pop(term[2].input[1])).T
            for constant in (term[0].input[1], term[1].input[1]):
                initializers.pop(constant, None)
            dropped.update(t.name for t in term)
            node.output[0] = add.output[0]
        scales, block = kernel_blocks(scales, n, k, attrs["block_size"])
        minimums, _ = kernel_blocks(minimums, n, k, attrs["block_size"])
        codes, minimums = exact_minimums(unpack_matmul_nbits(packed, n, k, bits), scales, minimums, block)
        weights, params = repack(codes, scales, minimums, block, bits)
        names = [f"{node.input[1]}.int{bits}_tiles", f"{node.input[2]}.int{bits}_params"]
        initializers[names[0]] = numpy_helper.from_array(weights, names[0])
        initializers[names[1]] = numpy_helper.from_array(params, names[1])
        inputs = [node.input[0], *names]
        node.ClearField("attribute")
        node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n), helper.make_attribute("block", block)])
        del node.input[:]
        node.input.extend(inputs)
        node.op_type, node.domain = OPS[bits], DOMAIN
        rewritten[bits] += 1
    kept_nodes = [node for node in model.graph.node if node.name not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept_nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers.values())
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    data = path.parent / (path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    ship_library(library, path.parent, record)
    return {"matmul_kernel": "vlm_export.cpu::Int4MatMul/Int8MatMul (AVX-512 VNNI)", "int4_kernel_matmuls": rewritten[4],
            "int8_kernel_matmuls": rewritten[8], "matmul_nbits_kept": kept}
