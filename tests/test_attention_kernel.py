"""vlm-export's attention kernel (kernels/attention.c) computes what ONNX Runtime's
com.microsoft.GroupQueryAttention computes, in the form the inplace decoder uses: packed q|k|v,
rotary inside, right-padded batches, past and present one buffer; and the graph pass moves only
that form."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vlm_export.kernels.attention_graph import use_attention_kernel
from vlm_export.kernels.library import DOMAIN, compile_library, unavailable_reason

needs_kernel = pytest.mark.skipif(unavailable_reason() is not None, reason=f"kernels: {unavailable_reason()}")
ROTARY_ROWS = 2048
SMOL = (9, 3, 64)  # query heads, KV heads, head size
SHAPES = [SMOL, (16, 16, 128), (4, 2, 48)]  # + MobileLLaMA-1.4B's (no grouping), a head size not a multiple of 64


def _model(domain: str, shape=SMOL, **extra) -> onnx.ModelProto:
    HEADS, KV_HEADS, HEAD_DIM = shape
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    cache = ["B", KV_HEADS, "C", HEAD_DIM]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", width]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["R", HEAD_DIM // 2]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["R", HEAD_DIM // 2])]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k",
                                                    "total_sequence_length", "cos", "sin"],
                            ["output", "present_key", "present_value"], domain=domain, num_heads=HEADS,
                            kv_num_heads=KV_HEADS, do_rotary=1, rotary_interleaved=0, **extra)
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output]
    return helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    directory = tmp_path_factory.mktemp("attention")
    return compile_library(directory)


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "heads{}-kv{}-dim{}".format(*s))
def sessions(request, library):
    """(ONNX Runtime's op, the kernel's op after the graph pass), both on two threads, and the shape."""
    import onnxruntime as ort

    from vlm_export.runtime.runners.ort_runner import register_kernels

    model = _model("com.microsoft", request.param)
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    assert use_attention_kernel(moved) == 1
    assert [(n.domain, n.op_type) for n in moved.graph.node] == [(DOMAIN, "GroupQueryAttention")]
    plain, native = ort.SessionOptions(), ort.SessionOptions()
    plain.intra_op_num_threads = 2
    register_kernels(native, library)
    native.intra_op_num_threads = 2
    return (ort.InferenceSession(model.SerializeToString(), plain, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(moved.SerializeToString(), native, providers=["CPUExecutionProvider"]), request.param)


def _feeds(shape, batch: int, seq: int, totals: list[int], capacity: int = 1100) -> dict:
    HEADS, KV_HEADS, HEAD_DIM = shape
    rng = np.random.default_rng(sum(totals) + seq)
    angles = np.arange(ROTARY_ROWS)[:, None] / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)[None]
    cache = (batch, KV_HEADS, capacity, HEAD_DIM)
    return {"qkv": rng.standard_normal((batch, seq, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32),
            "past_key": rng.standard_normal(cache).astype(np.float32),
            "past_value": rng.standard_normal(cache).astype(np.float32),
            "seqlens_k": np.array(totals, np.int32) - 1, "total_sequence_length": np.array(max(totals), np.int32),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}


@needs_kernel
@pytest.mark.parametrize("batch, seq, totals", [
    (1, 1, [130]),        # decode, one chunk
    (1, 1, [1030]),       # decode, 9 chunks of 128 merged
    (2, 1, [500, 77]),    # decode, a batch of two lengths
    (1, 17, [17]),        # first prefill
    (2, 20, [20, 13]),    # first prefill, right-padded batch
    (1, 5, [300]),        # a prefill after a cached prefix
    (1, 12, [40]),        # below the GEMM-shaped path's rows: the decode path
    (1, 256, [770]),      # the GEMM-shaped path: 256 rows after 514 cached, slots not a multiple of 16
    (2, 37, [37, 21]),    # the same, a first prefill of a right-padded batch: rows end mid row block
    (1, 1024, [1024]),    # a whole 1,024-token chunk at once
])
def test_kernel_matches_onnx_runtime(sessions, batch, seq, totals):
    reference, kernel, shape = sessions
    feeds = _feeds(shape, batch, seq, totals)
    expected = reference.run(None, {k: v.copy() for k, v in feeds.items()})
    got = kernel.run(None, {k: v.copy() for k, v in feeds.items()})
    for b, total in enumerate(totals):
        valid = min(seq, total)
        np.testing.assert_allclose(got[0][b, :valid], expected[0][b, :valid], atol=3e-6, rtol=0)
        for cache in (1, 2):  # the rows this call wrote, and the past it kept
            np.testing.assert_array_equal(got[cache][b, :, :total - valid], feeds["past_key" if cache == 1 else "past_value"][b, :, :total - valid])
            np.testing.assert_allclose(got[cache][b, :, :total], expected[cache][b, :, :total], atol=1e-6, rtol=0)
        assert not got[0][b, valid:].any()  # padding rows: zero


@needs_kernel
def test_kernel_refuses_a_length_outside_the_cache(sessions):
    _, kernel, shape = sessions
    with pytest.raises(Exception, match="seqlens_k is outside the KV cache"):
        kernel.run(None, _feeds(shape, 1, 1, [1200]))


@pytest.mark.parametrize("extra", [{"softcap": 30.0}, {"local_window_size": 64}, {"scale": 0.5}])
def test_pass_leaves_other_forms_to_onnx_runtime(extra):
    model = _model("com.microsoft", **extra)
    assert use_attention_kernel(model) == 0
    assert model.graph.node[0].domain == "com.microsoft"
