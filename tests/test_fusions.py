"""The block fusions (kernels/fusions.py) compute what the exporter's ops computed: RMSNorm and its
residual Add as ORT's (Skip)SimplifiedLayerNormalization, SwiGLU as the kernel matmul's epilogue."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.kernels.fusions import fuse_rms_norms, fuse_swiglu
from vlm_export.kernels.library import compile_library, unavailable_reason

needs_kernel = pytest.mark.skipif(unavailable_reason() is not None, reason=f"kernels: {unavailable_reason()}")
WIDTH, EPS = 64, 1e-5


def _rms_norm(prefix: str, x: str, weight: str) -> tuple[list, list, str]:
    """The exporter's decomposed RMSNorm of `x` (as torch.onnx writes LlamaRMSNorm)."""
    consts = [numpy_helper.from_array(np.array(v, np.float32), f"{prefix}/{n}") for n, v in
              (("two", 2.0), ("eps", EPS), ("one", 1.0))]
    nodes = [helper.make_node("Pow", [x, f"{prefix}/two"], [f"{prefix}/pow"], name=f"{prefix}/Pow"),
             helper.make_node("ReduceMean", [f"{prefix}/pow"], [f"{prefix}/mean"], name=f"{prefix}/ReduceMean", axes=[-1], keepdims=1),
             helper.make_node("Add", [f"{prefix}/mean", f"{prefix}/eps"], [f"{prefix}/add"], name=f"{prefix}/Add"),
             helper.make_node("Sqrt", [f"{prefix}/add"], [f"{prefix}/sqrt"], name=f"{prefix}/Sqrt"),
             helper.make_node("Div", [f"{prefix}/one", f"{prefix}/sqrt"], [f"{prefix}/div"], name=f"{prefix}/Div"),
             helper.make_node("Mul", [x, f"{prefix}/div"], [f"{prefix}/mul"], name=f"{prefix}/Mul"),
             helper.make_node("Mul", [weight, f"{prefix}/mul"], [f"{prefix}/out"], name=f"{prefix}/Mul_1")]
    return nodes, consts, f"{prefix}/out"


def _run(model: onnx.ModelProto, feeds: dict, library=None) -> list:
    import onnxruntime as ort

    from vlm_export.runtime.runners.ort_runner import register_kernels

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    if library is not None:
        register_kernels(options, library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_rms_norms_and_their_residual_adds_fuse_exactly():
    """norm(a) plain; x = a + b read by norm(x) and by a later Add: Skip form, the sum kept."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), f"w{i}") for i in range(2)]
    first, c1, out1 = _rms_norm("/n1", "a", "w0")
    second, c2, out2 = _rms_norm("/n2", "x", "w1")
    nodes = [*first, helper.make_node("Add", ["a", out1], ["x"], name="/res"), *second,
             helper.make_node("Add", ["x", out2], ["z"], name="/res2")]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, WIDTH])
    graph = helper.make_graph(nodes, "g", [value("a")], [value(out2), value("z")], weights + c1 + c2)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"a": rng.standard_normal((1, 3, WIDTH)).astype(np.float32)}
    expected = _run(model, feeds)
    assert fuse_rms_norms(model) == {"rms_norms": 2, "skip_rms_norms": 1}
    assert [n.op_type for n in model.graph.node] == ["SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Add"]
    for got, want in zip(_run(model, feeds), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_norm_of_another_shape_is_left_alone():
    """ReduceMean over another axis is not an RMSNorm over the hidden size: nothing fuses."""
    nodes, consts, out = _rms_norm("/n", "a", "w")
    nodes[1].attribute[0].CopyFrom(helper.make_attribute("axes", [1]))
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, WIDTH])
    weight = numpy_helper.from_array(np.ones(WIDTH, np.float32), "w")
    model = helper.make_model(helper.make_graph(nodes, "g", [value("a")], [value(out)], [weight, *consts]))
    assert fuse_rms_norms(model) == {"rms_norms": 0, "skip_rms_norms": 0}
    assert len(model.graph.node) == 7


def _mlp_model(path, hidden: int = 48):
    """x -> gate|up projection -> the exporter's chunk(2), silu(gate) * up."""
    rng = np.random.default_rng(1)
    consts = {"w": (rng.standard_normal((WIDTH, 2 * hidden)) * 0.1).astype(np.float32), "zero": np.array([0]),
              "half": np.array([hidden]), "end": np.array([np.iinfo(np.int64).max]), "axis": np.array([-1])}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["gu"], name="/blocks.0/mlp/gate_up_proj/MatMul"),
             helper.make_node("Slice", ["gu", "zero", "half", "axis"], ["gate"], name="/mlp/Slice"),
             helper.make_node("Slice", ["gu", "half", "end", "axis"], ["up"], name="/mlp/Slice_1"),
             helper.make_node("Sigmoid", ["gate"], ["sig"], name="/mlp/act_fn/Sigmoid"),
             helper.make_node("Mul", ["gate", "sig"], ["silu"], name="/mlp/act_fn/Mul"),
             helper.make_node("Mul", ["silu", "up"], ["y"], name="/mlp/Mul_2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", hidden])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_swiglu_moves_into_the_kernel_matmul(tmp_path, bits):
    from vlm_export.quantize.matmul_kernel import use_matmul_kernel
    from vlm_export.quantize.weight_only import WeightOnlyConfig, quantize_weights

    _mlp_model(tmp_path / "fp32.onnx")
    quantize_weights(tmp_path / "fp32.onnx", tmp_path / "kernel.onnx", WeightOnlyConfig(bits=bits))
    library = compile_library(tmp_path)
    assert use_matmul_kernel(tmp_path / "kernel.onnx", {}, library)[f"int{bits}_kernel_matmuls"] == 1
    model = onnx.load(str(tmp_path / "kernel.onnx"))
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 3, WIDTH)).astype(np.float32)}
    expected = _run(model, feeds, library)[0]
    assert fuse_swiglu(model) == 1
    assert [(n.op_type, {a.name: a.i for a in n.attribute}.get("swiglu")) for n in model.graph.node] == [(f"Int{bits}MatMul", 1)]
    got = _run(model, feeds, library)[0]
    assert got.shape == (2, 3, 48)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_swiglu_needs_the_exporters_halves(tmp_path):
    """gate taken from the second half: not the pattern the epilogue computes, left alone."""
    _mlp_model(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    model.graph.node[0].domain, model.graph.node[0].op_type = "vlm_export.cpu", "Int4MatMul"
    model.graph.node[0].attribute.extend([helper.make_attribute("N", 96)])
    model.graph.node[1].input[1], model.graph.node[1].input[2] = "half", "end"
    model.graph.node[2].input[1], model.graph.node[2].input[2] = "zero", "half"
    assert fuse_swiglu(model) == 0 and len(model.graph.node) == 6
