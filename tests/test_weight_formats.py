"""Blockwise weight formats (quantize/blocks.py, weight_only.py): GGUF blocks carried over bit for
bit, min/max (zero-point) blocks, and the graphs that hold them."""

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf.quants import dequantize, quantize
from onnx import TensorProto, helper, numpy_helper

from vlm_export.quantize.blocks import GgufBlocks, quantize_asymmetric, quantize_symmetric
from vlm_export.quantize.weight_only import WeightOnlyConfig, quantize_weights

KINDS = {"Q4_0": gguf.GGMLQuantizationType.Q4_0, "Q4_1": gguf.GGMLQuantizationType.Q4_1,
         "Q8_0": gguf.GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A GGUF with one (48, 64) tensor per block kind, and its raw blocks."""
    path = tmp_path_factory.mktemp("gguf") / "blocks.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    rng = np.random.default_rng(0)
    raw = {}
    for kind, qtype in KINDS.items():
        weight = (rng.standard_normal((48, 64)) * 0.05 + rng.uniform(-0.02, 0.02, (48, 1))).astype(np.float32)
        raw[kind] = quantize(weight, qtype)
        writer.add_tensor(f"blk.0.{kind}.weight", raw[kind], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, raw


def _fields(kind: str, raw: np.ndarray):
    """d (and m) per block straight from the bytes, ggml's layout (ggml-common.h block_q4_0/q4_1/q8_0)."""
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
    blocks = raw.reshape(-1, size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(48, -1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(48, -1) if kind == "Q4_1" else None
    return d, m


@pytest.mark.parametrize("kind", list(KINDS))
def test_gguf_blocks_are_carried_over_exactly(gguf_file, kind):
    path, raw = gguf_file
    values = dequantize(raw[kind], KINDS[kind])  # (48, 64): what a loader hands the exporter
    order = np.random.default_rng(1).permutation(48)  # a row permutation (the q/k rotary one, for instance)
    found = GgufBlocks(path).find(values[order])
    assert found is not None and found.origin == f"gguf {kind} (exact)" and found.block == 32
    d, m = _fields(kind, raw[kind])
    assert np.array_equal(found.scales, d[order])
    minimum = {"Q4_0": -8 * d, "Q4_1": m, "Q8_0": -128 * d}[kind]
    assert np.array_equal(found.minimums, minimum[order])
    assert np.array_equal(found.dequantize(), values[order])  # bit for bit


def test_fused_rows_from_two_tensors_and_misses(gguf_file):
    path, raw = gguf_file
    blocks = GgufBlocks(path)
    q40, q41 = dequantize(raw["Q4_0"], KINDS["Q4_0"]), dequantize(raw["Q4_1"], KINDS["Q4_1"])
    other = dequantize(raw["Q4_1"], KINDS["Q4_1"]).copy()
    assert blocks.find(np.concatenate([q41[:10], q41[20:30]])) is not None  # a fused q|k-style weight
    assert blocks.find(np.concatenate([q40[:10], q41[:10]])) is None  # two kinds: not one format
    other[3, 5] += 1e-3
    assert blocks.find(other) is None  # a value that is not the GGUF's


def _matmul_model(path, weight_t: np.ndarray, name: str):
    n, k = weight_t.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name=name)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
                              [numpy_helper.from_array(np.ascontiguousarray(weight_t.T), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_q4_1_graph_holds_the_gguf_codes_and_computes_them(gguf_file, tmp_path):
    """The int4 graph of a Q4_1 weight: MatMulNBits over the GGUF's own nibbles and scales (default
    zero point 8) plus the offset term m + 8 d; in ONNX Runtime it computes x @ W of the dequantized GGUF."""
    path, raw = gguf_file
    values = dequantize(raw["Q4_1"], KINDS["Q4_1"])
    _matmul_model(tmp_path / "fp32.onnx", values, "/blocks.0/mlp/down_proj/MatMul")
    done = quantize_weights(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", WeightOnlyConfig(bits=4), GgufBlocks(path))
    assert done["weight_origins"] == {"4-bit gguf Q4_1 (exact)": 1}
    graph = onnx.load(str(tmp_path / "int4.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qs = raw["Q4_1"].reshape(-1, 20)[:, 4:]  # element j: low nibble of byte j, element j + 16: high nibble
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).reshape(48, 64)
    packed = inits["w.nbits"].reshape(48, 64 // 2)
    assert np.array_equal(packed & 0x0F, codes[:, 0::2]) and np.array_equal(packed >> 4, codes[:, 1::2])
    d, m = _fields("Q4_1", raw["Q4_1"])
    assert np.array_equal(inits["w.scales"].reshape(48, 2), d)
    assert np.allclose(inits["w.block_offsets"].T - 8 * d, m, rtol=0, atol=1e-7)  # m + 8 d beside the centred codes
    options = ort.SessionOptions()
    x = np.random.default_rng(2).standard_normal((1, 3, 64)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "int4.onnx"), options).run(None, {"x": x})[0]
    expected = x.astype(np.float64) @ values.T.astype(np.float64)
    assert np.abs(y - expected).max() < 0.02 * np.abs(expected).max()  # int8 activations (accuracy level 4)


def test_the_int8_and_int4_variants_search_the_gguf_once_per_weight(gguf_file, tmp_path, monkeypatch):
    """The second quantization of the same source graph takes find's answers from memory (keyed by
    the file's digest and the initializer): the same blocks, no second search; another file's
    values are searched."""
    path, raw = gguf_file
    source = GgufBlocks(path)
    searched, search = [], GgufBlocks._find
    monkeypatch.setattr(GgufBlocks, "_find", lambda self, w: searched.append(w.shape) or search(self, w))
    values = dequantize(raw["Q4_1"], KINDS["Q4_1"])
    _matmul_model(tmp_path / "fp32.onnx", values, "/blocks.0/mlp/down_proj/MatMul")
    int8 = quantize_weights(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", WeightOnlyConfig(bits=8), source)
    int4 = quantize_weights(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", WeightOnlyConfig(bits=4), source)
    assert searched == [(48, 64)]
    assert int8["weight_origins"] == {"8-bit gguf Q4_1 (exact, in 8-bit codes)": 1}
    assert int4["weight_origins"] == {"4-bit gguf Q4_1 (exact)": 1}
    alone = quantize_weights(tmp_path / "fp32.onnx", tmp_path / "int4-alone.onnx", WeightOnlyConfig(bits=4), GgufBlocks(path))
    assert alone == int4 and len(searched) == 2
    assert (tmp_path / "int4-alone.onnx").read_bytes() == (tmp_path / "int4.onnx").read_bytes()
    _matmul_model(tmp_path / "other.onnx", values + 1e-3, "/blocks.0/mlp/down_proj/MatMul")
    quantize_weights(tmp_path / "other.onnx", tmp_path / "other4.onnx", WeightOnlyConfig(bits=4), source)
    assert len(searched) == 3


def test_lm_head_keeps_eight_bits_and_int8_requantizes_a_4_bit_source(gguf_file, tmp_path):
    path, raw = gguf_file
    source = GgufBlocks(path)
    q8 = dequantize(raw["Q8_0"], KINDS["Q8_0"])
    _matmul_model(tmp_path / "head.onnx", q8, "/lm_head/MatMul")
    done = quantize_weights(tmp_path / "head.onnx", tmp_path / "head4.onnx", WeightOnlyConfig(bits=4), source)
    assert done["weight_origins"] == {"8-bit gguf Q8_0 (exact)": 1}
    q41 = dequantize(raw["Q4_1"], KINDS["Q4_1"])
    _matmul_model(tmp_path / "w.onnx", q41, "/blocks.0/attn/o_proj/MatMul")
    done = quantize_weights(tmp_path / "w.onnx", tmp_path / "w8.onnx", WeightOnlyConfig(bits=8), source)
    assert done["weight_origins"] == {"8-bit gguf Q4_1 (exact, in 8-bit codes)": 1}
    # the GGUF's own codes, centred on the 8-bit zero point 128: q + 120, same scales
    graph = onnx.load(str(tmp_path / "w8.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    qs = raw["Q4_1"].reshape(-1, 20)[:, 4:]
    assert np.array_equal(inits["w.nbits"].reshape(48, 64), np.concatenate([qs & 0x0F, qs >> 4], axis=1).reshape(48, 64) + 120)
    d, m = _fields("Q4_1", raw["Q4_1"])
    assert np.array_equal(inits["w.scales"].reshape(48, 2), d)
    assert np.allclose(inits["w.block_offsets"].T - 8 * d, m, rtol=0, atol=1e-7)
    # float weights: min/max 8-bit blocks of their own
    other = dequantize(raw["Q4_1"], KINDS["Q4_1"]) + 1e-3
    _matmul_model(tmp_path / "f.onnx", other, "/blocks.0/attn/o_proj/MatMul")
    done = quantize_weights(tmp_path / "f.onnx", tmp_path / "f8.onnx", WeightOnlyConfig(bits=8), source)
    assert done["weight_origins"] == {"8-bit asymmetric round-to-nearest": 1}


def test_min_max_blocks_beat_symmetric_on_an_offset_weight():
    """A block whose values do not straddle zero: min/max blocks use all 16 codes, absmax ones half."""
    rng = np.random.default_rng(3)
    weight = (rng.uniform(0.1, 0.2, (16, 64))).astype(np.float32)
    asym, sym = quantize_asymmetric(weight, 4, 32), quantize_symmetric(weight, 4, 32)
    assert asym.codes.min() == 0 and asym.codes.max() == 15
    err = lambda b: np.abs(b.dequantize() - weight).max()
    assert err(asym) < err(sym) / 1.5
    assert err(asym) <= asym.scales.max() * 0.51 + 1e-6  # at most half a step (float16 parameters)
    assert np.array_equal(asym.scales, asym.scales.astype(np.float16).astype(np.float32))
