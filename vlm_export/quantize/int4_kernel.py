"""MatMulNBits (4-bit, symmetric) -> `vlm_export.cpu::Int4MatMul`: same weights, repacked.

The values are not re-quantized: each weight keeps MatMulNBits' int4 code and fp32 block scale,
only their order changes to the one kernels/int4_matmul.c streams (16 outputs per 64-byte line).
A node the kernel cannot take (zero points, g_idx, bias, K not a multiple of 32) stays MatMulNBits.

When K is not a multiple of the block (a width below 128, in small models), MatMulNBits pads the
last block with zeros; the kernel instead takes blocks of gcd(block, K) inputs, each carrying its
parent block's scale, which is the same matrix.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vlm_export.kernels.library import DOMAIN, LIBRARY

TILE = 16  # outputs per 64-byte line


def unpack_matmul_nbits(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """MatMulNBits' B (N, ceil(K/block), block/2) uint8, two codes per byte (low nibble first) -> (N, K) codes 0..15."""
    packed = packed.reshape(n, -1)
    codes = np.empty((n, packed.shape[1] * 2), np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes[:, :k]


def kernel_blocks(scales: np.ndarray, n: int, k: int, block: int) -> tuple[np.ndarray, int]:
    """MatMulNBits' (N, ceil(K/block)) scales -> the kernel's (N, K/sub) scales and its block `sub`."""
    sub = math.gcd(block, k)
    per_block = np.repeat(scales.reshape(n, -1), block // sub, axis=1)
    return per_block[:, : k // sub], sub


def repack(codes: np.ndarray, scales: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) codes and (N, K/block) scales -> the kernel's weight bytes and (tiles, K/block, 16) scales.

    Line v of block b of tile t, byte 4c + i: low nibble = code[16t + c][b*block + 8v + i],
    high nibble = code[16t + c][b*block + 8v + 4 + i]. Outputs past N (the last tile) get code 8
    and scale 0: they compute zeros the kernel never stores.
    """
    n, k = codes.shape
    tiles, blocks = -(-n // TILE), k // block
    padded = np.full((tiles * TILE, k), 8, np.uint8)
    padded[:n] = codes
    # (t, c, b, v, half, i) -> (t, b, v, c, i, half)
    lines = padded.reshape(tiles, TILE, blocks, block // 8, 2, 4).transpose(0, 2, 3, 1, 5, 4)
    weights = (lines[..., 0] | (lines[..., 1] << 4)).astype(np.uint8)
    tile_scales = np.zeros((tiles * TILE, blocks), np.float32)
    tile_scales[:n] = scales.reshape(n, blocks)
    return np.ascontiguousarray(weights).reshape(-1), np.ascontiguousarray(tile_scales.reshape(tiles, TILE, blocks).transpose(0, 2, 1))


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def kernel_takes(node: onnx.NodeProto) -> bool:
    attrs = _attributes(node)
    extra_inputs = [name for name in node.input[3:] if name]
    return (node.op_type == "MatMulNBits" and attrs.get("bits", 4) == 4 and not extra_inputs
            and math.gcd(attrs["block_size"], attrs["K"]) % 32 == 0)


def use_int4_kernel(path: Path, record: dict, library: Path) -> dict:
    """Rewrites the graph at `path` in place (and its data file), ships `library` beside it and
    names it in the manifest `record` so the runtime registers it."""
    model = onnx.load(str(path), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    rewritten, kept = 0, 0
    for node in model.graph.node:
        if not kernel_takes(node):
            kept += node.op_type == "MatMulNBits"
            continue
        attrs = _attributes(node)
        n, k = attrs["N"], attrs["K"]
        packed, scales = (numpy_helper.to_array(initializers.pop(name)) for name in node.input[1:3])
        scales, block = kernel_blocks(scales, n, k, attrs["block_size"])
        weights, tile_scales = repack(unpack_matmul_nbits(packed, n, k), scales, block)
        names = [f"{node.input[1]}.int4_tiles", f"{node.input[2]}.int4_tiles"]
        initializers[names[0]] = numpy_helper.from_array(weights, names[0])
        initializers[names[1]] = numpy_helper.from_array(tile_scales, names[1])
        inputs = [node.input[0], *names]
        node.ClearField("attribute")
        node.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n), helper.make_attribute("block", block)])
        del node.input[:]
        node.input.extend(inputs)
        node.op_type, node.domain = "Int4MatMul", DOMAIN
        rewritten += 1
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers.values())
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    data = path.parent / (path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    if Path(library).resolve() != (path.parent / LIBRARY).resolve():
        shutil.copyfile(library, path.parent / LIBRARY)
    record["custom_op_library"] = LIBRARY
    return {"int4_kernel": "vlm_export.cpu::Int4MatMul (AVX-512 VNNI)", "int4_kernel_matmuls": rewritten,
            "matmul_nbits_kept": kept}
