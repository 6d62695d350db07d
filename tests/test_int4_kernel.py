"""vlm-export's int4 kernel (vlm_export/kernels): the repack is exact, and the op computes what
ONNX Runtime's MatMulNBits computes from the same codes and scales."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.errors import VlmExportError
from vlm_export.kernels.library import LIBRARY, compile_library, unavailable_reason
from vlm_export.quantize.matmul_kernel import TILE, exact_minimums, minimums_of, repack, unpack_matmul_nbits, use_matmul_kernel
from vlm_export.quantize.weight_only import WeightOnlyConfig, quantize_weights

needs_kernel = pytest.mark.skipif(unavailable_reason() is not None, reason=f"int4 kernel: {unavailable_reason()}")


def _unrepack(weights: np.ndarray, params: np.ndarray, n: int, k: int, block: int):
    """The layout int4_matmul.c documents, read back element by element's rule."""
    tiles, blocks = params.shape[:2]
    lines = weights.reshape(tiles, blocks, block // 8, TILE, 4)
    codes = np.empty((tiles * TILE, k), np.uint8)
    for half, nibble in ((0, lines & 0x0F), (1, lines >> 4)):
        # (t, b, v, c, i) -> code[16t + c][b*block + 8v + 4*half + i]
        codes.reshape(tiles, TILE, blocks, block // 8, 2, 4)[:, :, :, :, half, :] = nibble.transpose(0, 3, 1, 2, 4)
    per_output = lambda part: part.transpose(0, 2, 1).reshape(tiles * TILE, blocks)[:n].astype(np.float32)
    return codes[:n], per_output(params[..., :TILE]), per_output(params[..., TILE:])


@pytest.mark.parametrize("n, k, block", [(16, 128, 128), (100, 64, 32), (48, 256, 64)])
def test_repack_is_a_permutation(n, k, block):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scales = rng.random((n, k // block), dtype=np.float32).astype(np.float16).astype(np.float32)
    minimums = -rng.random((n, k // block), dtype=np.float32).astype(np.float16).astype(np.float32)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, k // block, block // 2)  # MatMulNBits' order
    assert (unpack_matmul_nbits(packed, n, k) == codes).all()
    weights, params = repack(codes, scales, minimums, block)
    assert weights.size == -(-n // TILE) * k * 8 and params.shape == (-(-n // TILE), k // block, 2 * TILE)
    assert params.dtype == np.float16
    back_codes, back_scales, back_minimums = _unrepack(weights, params, n, k, block)
    assert (back_codes == codes).all() and (back_scales == scales).all() and (back_minimums == minimums).all()


def test_8bit_repack_follows_the_documented_layout():
    """8-bit: byte 4c + i of line v of block b of tile t = code[16t + c][b*block + 4v + i]."""
    n, k, block = 20, 64, 32
    codes = np.random.default_rng(3).integers(0, 256, (n, k), dtype=np.uint8)
    ones = np.ones((n, k // block), np.float32)
    weights, params = repack(codes, ones, -ones, block, bits=8)
    assert weights.size == 2 * TILE * k and params.shape == (2, k // block, 2 * TILE)
    lines = weights.reshape(2, k // block, block // 4, TILE, 4)
    for t, b, v, c, i in [(0, 0, 0, 0, 0), (0, 1, 7, 15, 3), (1, 0, 3, 3, 2), (1, 1, 5, 2, 1)]:
        assert lines[t, b, v, c, i] == codes[16 * t + c, b * block + 4 * v + i]
    assert not lines[1, :, :, n - 16:].any()  # outputs past N: code 0
    packed = codes.reshape(n, k // block, block)  # MatMulNBits 8-bit: one code per byte
    assert (unpack_matmul_nbits(packed, n, k, bits=8) == codes).all()


def test_minimums_stay_float16_exact():
    """A Q4_1 block widened to 8-bit codes (q + 120, minimum m - 120 d) gets its own q and m back;
    a symmetric Q8_0-like block (q + 128, minimum -128 d: already exact) keeps its codes."""
    rng = np.random.default_rng(4)
    n, k, block = 4, 64, 32
    d = rng.random((n, 2)).astype(np.float16).astype(np.float32)
    m = -rng.random((n, 2)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, k))
    q[:, ::block] = 0  # min/max blocks hold their minimum
    codes, minimums = exact_minimums((q + 120).astype(np.uint8), d, m - 120 * d, block)
    assert (codes == q).all() and (minimums == m).all()
    symmetric = rng.integers(3, 250, (n, k)).astype(np.uint8)
    codes, minimums = exact_minimums(symmetric, d, -128 * d, block)
    assert (codes == symmetric).all() and (minimums == -128 * d).all()


def test_zero_points_become_minimums():
    scales = np.array([[0.5, 0.25]], np.float32)
    assert minimums_of(scales, None, 1, 2, bits=8).tolist() == [[-64.0, -32.0]]  # the 8-bit default 128
    assert minimums_of(scales, np.array([10, 200], np.uint8), 1, 2, bits=8).tolist() == [[-5.0, -50.0]]
    assert minimums_of(scales, None, 1, 2).tolist() == [[-4.0, -2.0]]  # the symmetric default 8
    assert minimums_of(scales, np.array([0x3A], np.uint8), 1, 2).tolist() == [[-5.0, -0.75]]  # 10, 3 (low nibble first)
    assert minimums_of(scales, np.array([1.5, -2.0], np.float32), 1, 2).tolist() == [[-0.75, 0.5]]


def _matmul_model(directory, k: int, n: int, block: int, symmetric: bool, bits: int = 4):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((k, n)) * 0.05 + 0.01).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/blocks.0/mlp/down_proj/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), directory / "fp32.onnx")
    quantize_weights(directory / "fp32.onnx", directory / "nbits.onnx", WeightOnlyConfig(bits=bits, block_size=block, symmetric=symmetric))
    onnx.save(onnx.load(str(directory / "nbits.onnx")), str(directory / "kernel.onnx"))
    record = {}
    done = use_matmul_kernel(directory / "kernel.onnx", record, compile_library(directory))
    assert done[f"int{bits}_kernel_matmuls"] == 1 and record["custom_op_library"] == LIBRARY
    return weight


def _sessions(directory, threads: int):
    import onnxruntime as ort

    from vlm_export.runtime.runners.ort_runner import register_kernels

    plain, native = ort.SessionOptions(), ort.SessionOptions()
    plain.intra_op_num_threads = native.intra_op_num_threads = threads
    register_kernels(native, directory / LIBRARY)
    return (ort.InferenceSession(str(directory / "nbits.onnx"), plain),
            ort.InferenceSession(str(directory / "kernel.onnx"), native))


def _dequantized_weight(directory) -> np.ndarray:
    """(K, N) float64: the MatMulNBits graph's weight as its codes, scales and zero points say."""
    graph = onnx.load(str(directory / "nbits.onnx")).graph
    node = next(node for node in graph.node if node.op_type == "MatMulNBits")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, k, block, bits = attrs["N"], attrs["K"], attrs["block_size"], attrs["bits"]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    codes = unpack_matmul_nbits(inits[node.input[1]], n, k, bits).astype(np.float64)
    scales = inits[node.input[2]].reshape(n, -1).astype(np.float64)
    minimums = minimums_of(inits[node.input[2]], inits.get(node.input[3]) if len(node.input) > 3 else None, n, k // block, bits)
    if "w.block_offsets" in inits:  # the offset term beside MatMulNBits
        minimums = minimums + inits["w.block_offsets"].T
    return (codes * np.repeat(scales, block, 1) + np.repeat(minimums.astype(np.float64), block, 1)).T


def _int8_activations(x: np.ndarray, block: int) -> np.ndarray:
    """The kernel's activation rounding (absmax / 127 per block of inputs, round half to even), dequantized."""
    blocks = x.astype(np.float64).reshape(*x.shape[:-1], -1, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    return (np.rint(blocks / np.where(scale == 0, 1, scale)) * scale).reshape(x.shape)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k, n, block", [(256, 4096, 128), (64, 100, 32), (96, 40, 32)])
def test_kernel_computes_the_blocks_with_int8_activations(tmp_path, k, n, block, symmetric, bits):
    """The kernel = int8 activations per block (llama.cpp's Q8_1) times exactly the weight MatMulNBits
    holds (min/max blocks with float zero points, or symmetric ones): equal to float rounding, and
    within the activations' rounding of MatMulNBits itself. N=100 ends in a partial tile; 4096
    outputs are split across two threads."""
    _matmul_model(tmp_path, k, n, block, symmetric, bits)
    nbits, native = _sessions(tmp_path, threads=2)
    graph = onnx.load(str(tmp_path / "kernel.onnx"))
    assert [(node.domain, node.op_type) for node in graph.graph.node] == [("vlm_export.cpu", f"Int{bits}MatMul")]
    weight = _dequantized_weight(tmp_path)
    rng = np.random.default_rng(2)
    for shape in [(1, 1, k), (1, 7, k), (2, 3, k)]:  # decode, prefill, batch
        x = rng.standard_normal(shape).astype(np.float32)
        got = native.run(None, {"x": x})[0]
        assert got.shape == shape[:-1] + (n,)
        expected = _int8_activations(x, block) @ weight
        assert np.abs(got - expected).max() <= 2e-5 * np.abs(expected).max()
        assert np.abs(got - nbits.run(None, {"x": x})[0]).max() <= 0.02 * np.abs(expected).max()


@needs_kernel
def test_kernel_refuses_a_wrong_width(tmp_path):
    _matmul_model(tmp_path, 128, 32, 128, symmetric=True)
    _, native = _sessions(tmp_path, threads=1)
    graph = onnx.load(str(tmp_path / "kernel.onnx"))
    graph.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "k"  # let a wrong width reach the kernel
    onnx.save(graph, str(tmp_path / "kernel.onnx"))
    _, native = _sessions(tmp_path, threads=1)
    with pytest.raises(Exception, match="Int4MatMul: the last dimension of A is not the node's K"):
        native.run(None, {"x": np.zeros((1, 1, 64), np.float32)})


def test_unavailable_kernel_is_one_line(monkeypatch, tmp_path):
    from vlm_export.kernels import library

    monkeypatch.setattr(library, "unavailable_reason", lambda: "this CPU lacks avx512_vnni, which the int4 kernel needs")
    with pytest.raises(VlmExportError, match="--kernels ort"):
        library.compile_library(tmp_path)
    assert not (tmp_path / LIBRARY).exists()


@pytest.mark.skipif(unavailable_reason() is not None, reason="needs x86-64 with AVX-512 VNNI and a C compiler")
def test_the_library_is_compiled_once_per_process(monkeypatch, tmp_path):
    """A build's second variant gets a copy of the first's library, not a second compile; a bad
    compiler flag is a one-line error that leaves no library behind."""
    from vlm_export.kernels import library

    first = library.compile_library(tmp_path / "a")
    monkeypatch.setattr(library, "_compile", lambda *a: pytest.fail("compiled again"))
    second = library.compile_library(tmp_path / "b")
    assert second.read_bytes() == first.read_bytes() and second != first
    monkeypatch.undo()
    monkeypatch.setitem(library.SOURCES, "attention.c", ["-mno-such-flag"])  # another key: compiled, and fails
    with pytest.raises(VlmExportError, match="compiling the int4 kernel failed: .*no-such-flag"):
        library.compile_library(tmp_path / "c")
    assert not (tmp_path / "c" / LIBRARY).exists()


@pytest.mark.skipif(unavailable_reason() is not None, reason="needs x86-64 with AVX-512 VNNI and a C compiler")
def test_a_compile_started_early_is_waited_for_not_repeated(monkeypatch, tmp_path):
    from vlm_export.kernels import library

    monkeypatch.setattr(library, "_BUILT", {})
    monkeypatch.setattr(library, "_COMPILING", {})
    calls, original = [], library._compile
    monkeypatch.setattr(library, "_compile", lambda *a: (calls.append(a), original(*a))[1])
    library.compile_soon()
    library.compile_soon()  # already under way: not a second one
    assert len(library._COMPILING) == 1
    first, second = library.compile_library(tmp_path / "a"), library.compile_library(tmp_path / "b")
    assert len(calls) == 1 and first.read_bytes() == second.read_bytes() and not library._COMPILING
