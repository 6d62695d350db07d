"""The vision tower's dynamic int8 pass writes the graph ORT's own quantizer writes (the same nodes,
names and weight codes), only vectorised."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from vlm_export.quantize.dynamic_int8 import per_channel_int8, quantize_dynamic_int8


def _graph(path):
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(16, 24)).astype(np.float32)
    w1[:, 3] = 0.0  # an all-zero column: its scale would underflow, ORT stores 1.0
    w1[:, 5] *= 1e-3
    w2 = (rng.normal(size=(16, 8)) + 2.0).astype(np.float32)  # all positive: the range still includes 0
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="second"),  # shares x's quantization
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["b", "y"], ["c"], name="activations"),  # no constant B: stays float
             helper.make_node("MatMul", ["r", "w3"], ["d"], name="third")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("c", "d")],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(rng.normal(size=(24, 6)).astype(np.float32), "w3")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_the_graph_and_codes_are_ort_quantizers(tmp_path):
    _graph(tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "ort.onnx"), per_channel=True,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    record = quantize_dynamic_int8(tmp_path / "float.onnx", tmp_path / "ours.onnx")
    assert (record["matmul_integer"], record["matmul_float"]) == (3, 1)
    theirs, ours = onnx.load(str(tmp_path / "ort.onnx")), onnx.load(str(tmp_path / "ours.onnx"))

    def nodes(model):
        return sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in model.graph.node)

    assert nodes(ours) == nodes(theirs)
    weights = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (theirs, ours)]
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert value.dtype == weights[1][name].dtype and np.array_equal(value, weights[1][name]), name
    assert weights[1]["w1_scale"][3] == 1.0 and not weights[1]["w1_quantized"][:, 3].any()
    feeds = {"x": np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32),
             "y": np.ones((8, 4), np.float32)}
    outputs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feeds)
               for f in ("ort.onnx", "ours.onnx")]
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))


def test_per_channel_codes_reconstruct_within_half_a_step():
    weight = np.random.default_rng(2).normal(size=(64, 32)).astype(np.float32)
    codes, scale = per_channel_int8(weight)
    assert codes.dtype == np.int8 and scale.shape == (32,) and np.abs(codes).max() == 127
    assert np.all(np.abs(codes * scale - weight) <= scale / 2 + 1e-7)


def test_the_source_read_over_a_memory_map_gives_one_self_contained_graph(tmp_path):
    """Inline or external source weights, large or small: the same int8 graph, every weight it keeps
    in float (a 2 KB bias here) byte for byte in the one output file."""
    rng = np.random.default_rng(2)
    w, bias = rng.normal(size=(32, 512)).astype(np.float32), rng.normal(size=(512,)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"),
                               helper.make_node("Add", ["m", "bias"], ["out"], name="bias_add")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "external").mkdir()
    onnx.save(model, str(tmp_path / "inline.onnx"))
    onnx.save(model, str(tmp_path / "external" / "g.onnx"), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    quantize_dynamic_int8(tmp_path / "inline.onnx", tmp_path / "a.onnx")
    quantize_dynamic_int8(tmp_path / "external" / "g.onnx", tmp_path / "b.onnx")
    a, b = onnx.load(str(tmp_path / "a.onnx"), load_external_data=False), onnx.load(str(tmp_path / "b.onnx"), load_external_data=False)
    assert a == b and all(t.data_location == TensorProto.DEFAULT for t in a.graph.initializer)
    kept = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    assert np.array_equal(kept["bias"], bias) and "w" not in kept
    codes, scale = per_channel_int8(w)
    assert np.array_equal(kept["w_quantized"], codes) and np.array_equal(kept["w_scale"], scale)
