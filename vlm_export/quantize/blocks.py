"""Blockwise weight formats: one representation for every quantized matmul weight the CPU builds.

    value[n, k] = scale[n, k // block] * code[n, k] + minimum[n, k // block]

with integer codes in 0 .. 2**bits - 1 and every scale and minimum a float16 value (kept in float32
arrays). That covers, bit for bit:
    llama.cpp Q4_1  (block 32, float16 d and m, codes 0..15)           value = d q + m
    llama.cpp Q4_0  (block 32, float16 d, codes 0..15)                 value = d (q - 8)  -> m = -8 d
    llama.cpp Q8_0  (block 32, float16 d, int8 x)                      value = d x        -> q = x + 128, m = -128 d
    ONNX Runtime MatMulNBits with a zero point z                      value = s (q - z)  -> m = -z s
(ggml-quants.c / gguf-py `quants.py` for the GGUF layouts; onnxruntime contrib op MatMulNBits.)

Weights that arrive quantized (a GGUF model) are carried over as they are (`GgufBlocks`: matched
to the graph's MatMul weights by value, row by row, so the q/k row permutation the GGUF converter
applies does not matter); float weights are quantized here (`quantize_asymmetric`,
`quantize_symmetric`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_export.errors import VlmExportError


@dataclass
class Blocks:
    """codes (N, K) uint8; scales, minimums (N, K // block) float32 holding float16 values."""

    codes: np.ndarray
    scales: np.ndarray
    minimums: np.ndarray
    bits: int
    block: int
    origin: str  # how the values were obtained: "gguf Q4_1 (exact)", "asymmetric round-to-nearest", ...

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, computed as llama.cpp computes it (d * q + m, float32)."""
        rep = lambda v: np.repeat(v, self.block, axis=1)
        return rep(self.scales) * self.codes.astype(np.float32) + rep(self.minimums)

    def zero_points(self) -> np.ndarray:
        """MatMulNBits' float zero points (N, K // block): value = scale * (q - z), z = -m / s.
        A constant block (s = 0) keeps s = |m| (or 1), q = 0, so that it still dequantizes to m."""
        scales = np.where(self.scales == 0, np.maximum(np.abs(self.minimums), 1e-30), self.scales)
        return (-self.minimums / scales).astype(np.float32)


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def _blocked(weight: np.ndarray, block: int) -> np.ndarray:
    n, k = weight.shape
    if k % block:
        raise VlmExportError(f"a weight with {k} inputs does not split into blocks of {block}",
                             "use a block size that divides every matmul's input width (32 divides all of LLaMA's)")
    return weight.astype(np.float32).reshape(n, k // block, block)


def quantize_asymmetric(weight: np.ndarray, bits: int, block: int) -> Blocks:
    """(N, K) float -> min/max blocks (llama.cpp's Q4_1 recipe: m = min, d = (max - min) / (2^bits - 1)),
    d and m rounded to float16 before the codes are chosen, so the codes fit the stored values."""
    x = _blocked(weight, block)
    top = 2 ** bits - 1
    lo, hi = x.min(axis=2), x.max(axis=2)
    minimums = _f16(lo)
    scales = _f16((hi - minimums) / top)
    safe = np.where(scales == 0, 1.0, scales)
    codes = np.clip(np.rint((x - minimums[..., None]) / safe[..., None]), 0, top).astype(np.uint8)
    return Blocks(codes.reshape(weight.shape), scales, minimums, bits, block, "asymmetric round-to-nearest")


def quantize_symmetric(weight: np.ndarray, bits: int, block: int) -> Blocks:
    """(N, K) float -> absmax blocks (llama.cpp's Q8_0 recipe for 8 bits: d = absmax / 127,
    x = round(w / d)); stored as codes x + 2^(bits-1) with m = -2^(bits-1) d."""
    x = _blocked(weight, block)
    half = 2 ** (bits - 1)
    scales = _f16(np.abs(x).max(axis=2) / (half - 1))
    safe = np.where(scales == 0, 1.0, scales)
    signed = np.clip(np.rint(x / safe[..., None]), -(half - 1), half - 1)
    codes = (signed + half).astype(np.uint8)
    return Blocks(codes.reshape(weight.shape), scales, -half * scales, bits, block, "symmetric round-to-nearest")


# GGUF block layouts this module reads: bytes per block of 32 and how to split them.
GGUF_BLOCK = 32


def _gguf_blocks(kind: str, raw: np.ndarray, n: int) -> Blocks:
    """raw (N, row bytes) uint8 of one GGUF tensor -> its blocks, unchanged."""
    blocks = raw.reshape(-1, raw.shape[-1] // (raw.shape[-1] // {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]))
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    if kind == "Q8_0":
        codes = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        minimums, bits = -128 * d, 8
    else:
        m_end = 4 if kind == "Q4_1" else 2
        qs = blocks[:, m_end:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # element j: low nibble of byte j; j + 16: high
        minimums = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if kind == "Q4_1" else -8 * d
        bits = 4
    per_row = codes.shape[0] // n
    return Blocks(codes.reshape(n, per_row * GGUF_BLOCK), d.reshape(n, per_row), minimums.reshape(n, per_row), bits,
                  GGUF_BLOCK, f"gguf {kind} (exact)")


def _row_keys(matrix: np.ndarray) -> list[tuple[int, int]]:
    """(width, 64-bit hash of the float32 bits) per row, vectorised: a multiply-add hash with fixed
    odd multipliers (wrapping mod 2^64) over the row's 64-bit words (two floats each; an odd width
    widens each float to one). A collision can only make `find` miss (it compares the values it
    gathers), never return wrong blocks. ~20x faster than a blake2b per row in Python, which cost
    seconds on a 49,152-row embedding; the two-float words halve it again (smol's decoder: ~2 s)."""
    bits = np.ascontiguousarray(matrix, np.float32).view(np.uint32)
    width = bits.shape[1]
    words = bits.view(np.uint64) if width % 2 == 0 else bits.astype(np.uint64)
    multipliers = np.random.default_rng(width).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) | np.uint64(1)
    hashes = np.zeros(bits.shape[0], dtype=np.uint64)
    for start in range(0, bits.shape[0], 4096):  # rows in slabs: no (rows x width) uint64 product at once
        hashes[start:start + 4096] = (words[start:start + 4096] * multipliers).sum(axis=1)
    return [(width, int(h)) for h in hashes]


class GgufBlocks:
    """The quantized tensors of a GGUF file (Q4_0, Q4_1, Q8_0), found by the values they dequantize to.

    A graph's MatMul weight W (K, N) was made from a GGUF tensor T (N', K) by dequantizing it and
    possibly permuting its rows (the q/k rotary permutation): each row of W.T is looked up among the
    dequantized rows of every tensor of the same width, and the blocks are gathered in W's row order.
    """

    KINDS = ("Q4_0", "Q4_1", "Q8_0")

    def __init__(self, path: Path):
        from gguf.quants import dequantize

        from vlm_export.spec.gguf_meta import read_gguf_reader

        self.path = Path(path)
        self._found: dict = {}  # find's answers by the caller's key
        reader = read_gguf_reader(self.path)
        self.tensors: dict[str, Blocks] = {}
        self.rows: dict[tuple[int, int], tuple[str, int]] = {}
        for tensor in reader.tensors:
            kind = tensor.tensor_type.name
            if kind not in self.KINDS:
                continue
            raw = np.asarray(tensor.data)
            n = raw.shape[0]
            self.tensors[tensor.name] = _gguf_blocks(kind, raw.reshape(n, -1), n)
            for row, key in enumerate(_row_keys(dequantize(raw, tensor.tensor_type).reshape(n, -1))):
                self.rows.setdefault(key, (tensor.name, row))

    def find(self, weight_t: np.ndarray, key=None) -> Blocks | None:
        """weight_t (N, K): the GGUF blocks that dequantize to exactly these rows, or None. Rows may
        come from several tensors of one kind (a fused q|k|v or gate|up weight). `key` (hashable):
        what identifies these values to the caller, e.g. its graph file's digest and the initializer's
        name; an answer found before under the same key is given again without the search (the int8
        and int4 variants look up the same fp32 weights: ~2.3 s per variant on smol)."""
        if key is not None and key in self._found:
            return self._found[key]
        found = self._find(weight_t)
        if key is not None:
            self._found[key] = found
        return found

    def _find(self, weight_t: np.ndarray) -> Blocks | None:
        hits = [self.rows.get(key) for key in _row_keys(weight_t)]
        if not hits or any(h is None for h in hits):
            return None
        sources = [self.tensors[name] for name in dict.fromkeys(name for name, _ in hits)]
        if len({source.origin for source in sources}) != 1:
            return None
        names = np.array([name for name, _ in hits])
        rows = np.array([row for _, row in hits], dtype=np.int64)

        def pick(field: str) -> np.ndarray:  # one fancy index per source tensor, rows in W's order
            first = getattr(sources[0], field)
            out = np.empty((len(hits), *first.shape[1:]), dtype=first.dtype)
            for name in dict.fromkeys(names.tolist()):
                at = names == name
                out[at] = getattr(self.tensors[name], field)[rows[at]]
            return out
        found = Blocks(pick("codes"), pick("scales"), pick("minimums"), sources[0].bits, sources[0].block, sources[0].origin)
        if not np.array_equal(found.dequantize(), np.asarray(weight_t, np.float32)):
            return None
        return found
