"""orin's int4 weight-only form (blocked DequantizeLinear-21 + a block-offset MatMul) and AWQ scales."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.quantize.awq import awq_scales, search_scale
from vlm_export.quantize.blocks import quantize_asymmetric, quantize_symmetric
from vlm_export.quantize.weight_only import MINIMUMS, int4_dequantize_matmul, quantize_weights_int4_qdq
from vlm_export.targets.orin.static_check import check_graph

K, N = 128, 48


def _norm_matmuls(path, norm: np.ndarray, weights: list[np.ndarray]) -> None:
    """x (1, T, K) -> Mul by an RMSNorm weight (named like the exporter's) -> one MatMul per weight."""
    nodes = [helper.make_node("Mul", ["x", "norm_weight"], ["normed"], name="/model/layers.0/input_layernorm/Mul_1")]
    inits = [numpy_helper.from_array(norm.astype(np.float32), "norm_weight")]
    outputs = []
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["normed", f"w{i}"], [f"y{i}"], name=f"/model/layers.0/proj{i}/MatMul"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, K])], outputs, inits)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(path, x: np.ndarray) -> list[np.ndarray]:
    """As the runtime runs a graph (its session config: float activations for int4 weight-only)."""
    import onnxruntime as ort

    from vlm_export.runtime.runners.ort_runner import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_min_max_blocks_are_held_exactly_in_tensorrt_form(tmp_path):
    """A weight on a Q4_1-style grid (min/max blocks of 32) survives the int4 form bit for bit: the
    symmetric codes plus the block-offset MatMul give x @ W to float rounding, and the graph passes
    TensorRT's parser check (zero points 0, opset 21)."""
    rng = np.random.default_rng(0)
    weight = quantize_asymmetric(rng.normal(0.3, 1, (N, K)), 4, 32).dequantize().T  # (K, N), off-centre
    _norm_matmuls(tmp_path / "fp32.onnx", np.ones(K), [weight])
    done = quantize_weights_int4_qdq(tmp_path / "fp32.onnx", tmp_path / "int4.onnx")
    assert done["int4_blocked_dequantize"] == 1 and done["block_offset_terms"] == 1
    x = rng.normal(size=(1, 5, K)).astype(np.float32)
    (got,) = _run(tmp_path / "int4.onnx", x)
    np.testing.assert_allclose(got, x @ weight, rtol=1e-5, atol=1e-4)
    model = onnx.load(str(tmp_path / "int4.onnx"))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and len(dq[0].input) == 2  # no zero point
    assert {i.name: i.data_type for i in model.graph.initializer}[dq[0].input[0]] == TensorProto.INT4
    import onnxruntime as ort  # ORT's own default fuses it into MatMulNBits with int8 activations: not TensorRT's numbers

    (fused,) = ort.InferenceSession(str(tmp_path / "int4.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.abs(fused - x @ weight).max() > 10 * np.abs(got - x @ weight).max()
    check = check_graph(tmp_path / "int4.onnx")
    assert check["passed"], check["problems"]


def test_symmetric_blocks_need_no_offset_term():
    weight = quantize_symmetric(np.random.default_rng(1).normal(size=(N, K)), 4, 32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/m/MatMul")
    nodes, _ = int4_dequantize_matmul(node, weight)
    assert [n.op_type for n in nodes] == ["DequantizeLinear", "MatMul"] and not any(MINIMUMS in n.name for n in nodes)
    with pytest.raises(Exception, match="cannot be written as int4"):
        int4_dequantize_matmul(node, quantize_symmetric(np.ones((N, K)), 8, 32))


def _outlier_activations(rng, rows: int) -> np.ndarray:
    x = rng.normal(size=(1, rows, K)).astype(np.float32)
    x[..., :4] *= 40  # a few salient channels, as LLaMA's norm outputs have
    return x


def test_awq_keeps_the_function_and_beats_round_to_nearest(tmp_path):
    """Folding AWQ scales leaves the float graph's outputs unchanged; after int4 quantization its
    output error on held-out activations with salient channels is below plain round-to-nearest's."""
    rng = np.random.default_rng(2)
    weights = [rng.normal(size=(K, N)).astype(np.float32), rng.normal(size=(K, 2 * N)).astype(np.float32)]
    _norm_matmuls(tmp_path / "fp32.onnx", rng.uniform(0.5, 1.5, K), weights)
    samples = [{"x": _outlier_activations(rng, 64)} for _ in range(4)]
    done = awq_scales(tmp_path / "fp32.onnx", tmp_path / "awq.onnx", samples)
    assert done["awq_norm_groups"] == 1 and done["awq_alpha_mean"] > 0
    assert done["awq_calibration_error"] < done["awq_calibration_error_rtn"]
    held_out = _outlier_activations(rng, 32)
    reference = _run(tmp_path / "fp32.onnx", held_out)
    for got, want in zip(_run(tmp_path / "awq.onnx", held_out), reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    quantize_weights_int4_qdq(tmp_path / "fp32.onnx", tmp_path / "rtn-int4.onnx")
    quantize_weights_int4_qdq(tmp_path / "awq.onnx", tmp_path / "awq-int4.onnx")
    error = lambda path: sum(float(np.square(g - w).sum()) for g, w in zip(_run(path, held_out), reference))
    assert error(tmp_path / "awq-int4.onnx") < 0.8 * error(tmp_path / "rtn-int4.onnx")


def test_scale_search_starts_from_round_to_nearest():
    """alpha = 0 (no scaling) is on the grid, so the chosen error is never above round-to-nearest's."""
    rng = np.random.default_rng(3)
    rows, weight = rng.normal(size=(64, K)).astype(np.float32), rng.normal(size=(K, N)).astype(np.float32)
    _, alpha, baseline, error = search_scale(rows, np.abs(rows).mean(axis=0), [weight], 4, 32)
    assert 0 <= alpha < 1 and error <= baseline
