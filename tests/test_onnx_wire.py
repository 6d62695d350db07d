"""Reading an ONNX graph without its weights (vlm_export/onnx_wire.py) against onnx's own parser."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.onnx_wire import as_external, read_without_weights


def _model(tmp_path, external: bool):
    """MatMul by a large weight, Add of a small one, a Constant node holding a large tensor attribute."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 300)).astype(np.float32)
    constant = rng.normal(size=(300,)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(constant, "c")),
             helper.make_node("Add", ["z", "c"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 300])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32([1.5]), "b")])
    path = tmp_path / "g.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=external, location="g.onnx.data", size_threshold=1024,
                    all_tensors_to_one_file=True)
    return path, weight


def test_the_graph_without_its_weights_is_onnx_loads_less_their_bytes(tmp_path):
    path, weight = _model(tmp_path, external=False)
    model, skipped = read_without_weights(path)
    expected = onnx.load(str(path))
    assert [(s.index, s.length) for s in skipped] == [(0, weight.nbytes)]  # the 4-byte bias stays inline
    assert path.read_bytes()[skipped[0].offset:skipped[0].offset + skipped[0].length] == weight.tobytes()
    expected.graph.initializer[0].ClearField("raw_data")
    assert model == expected  # every other field, the Constant's 1,200-byte attribute tensor included


def test_a_graph_pointed_at_its_own_bytes_runs_as_the_original(tmp_path):
    path, _ = _model(tmp_path, external=False)
    model, skipped = read_without_weights(path)
    as_external(model, skipped, path.name)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    feeds = {"x": np.random.default_rng(1).normal(size=(2, 8)).astype(np.float32)}
    copy = ort.InferenceSession(model.SerializeToString(), options).run(None, feeds)[0]
    np.testing.assert_array_equal(copy, ort.InferenceSession(str(path)).run(None, feeds)[0])


def test_external_data_is_left_as_it_was(tmp_path):
    path, _ = _model(tmp_path, external=True)
    model, skipped = read_without_weights(path)
    assert skipped == [] and model == onnx.load(str(path), load_external_data=False)


def test_bytes_that_are_not_a_graph_are_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x3a\xff\xff\xff\x0f not a model")
    with pytest.raises(ValueError, match="malformed"):
        read_without_weights(bad)
