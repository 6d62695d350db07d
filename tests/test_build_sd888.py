"""`vlm-export build --target sd888`: QNN context binaries run on the emulated Hexagon v68 with every
node on the NPU, XNNPACK/CPU variants with ORT-format models, and the bad-input paths."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli import vlm

qnn = pytest.mark.skipif(__import__("importlib").util.find_spec("onnxruntime_qnn") is None,
                         reason="needs onnxruntime-qnn (pip install '.[qnn]')")




@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd888")
    result = vlm("build", "tiny", "--target", "sd888", "--graphs", root / "graphs", "--out", root / "sd888")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "sd888", result.stdout, result.stderr


@qnn
def test_every_qnn_node_is_on_the_htp_of_the_888(built):
    from vlm_export.artifacts import binary_soc

    out, stdout, _ = built
    report = json.loads((out / "report.json").read_text())
    qnn_record = report["variants"]["qnn"]
    assert set(qnn_record["graphs"]) == {"vision.onnx", "decoder_prefill.onnx", "decoder_decode.onnx"}
    for graph in qnn_record["graphs"].values():
        assert graph["placement"]["on_qnn"] == graph["placement"]["nodes"] > 100
        assert graph["activations"] == "uint16" and graph["weights"].startswith("8-bit")
        assert graph["accuracy_vs_fp32"]["cosine_min"] > 0.95  # measured ~0.99 on tiny
    assert list(qnn_record["on_cpu"]) == ["embed.onnx"]  # and the reason is given
    manifest = json.loads((out / "qnn" / "manifest.json").read_text())
    for graph in (g for g in manifest["graphs"] if g.get("qnn")):
        assert binary_soc(out / "qnn" / graph["qnn"]["context_binary"]) == ("SM8350", "68")
        assert graph["qnn"]["embed_mode"] == 0 and graph["inputs"][0]["shape"][0] == 1
    assert "HTP v68" in stdout and "fits 8 GB phone" in stdout
    assert qnn_record["accuracy_vs_fp32"]["measured_on"].startswith("simulated")  # the CPU EP on the QDQ graphs
    assert "qnn's end-to-end quality is simulated" in (out / "report.md").read_text()
    assert not list(out.glob(".*"))  # the QDQ graphs of that check are not left in the build


@qnn
def test_decoder_weights_go_onto_the_htp_as_convs(built):
    """Every decoder MatMul with a constant weight became a 1x1 Conv before quantization (the form the
    HTP takes per-channel weight scales in), every RMSNorm one RMSNormalization, the MLP ranges got their
    margin, and the binaries still hold every node (test above)."""
    out, _, _ = built
    graphs = json.loads((out / "report.json").read_text())["variants"]["qnn"]["graphs"]
    for name in ("decoder_prefill.onnx", "decoder_decode.onnx"):
        assert graphs[name]["matmuls_as_conv"] == 2 * 7 + 1  # tiny: 2 layers x 7 projections, lm_head
        assert graphs[name]["rmsnorms_fused"] == 2 * 2 + 1  # two per layer, the final norm
        assert graphs[name]["ranges_widened"]["tensors"] >= 2 * 4 and graphs[name]["ranges_widened"]["factor"] == 4.0  # gate, up, SwiGLU, down per layer at least
    assert graphs["vision.onnx"]["matmuls_as_conv"] == 0


def test_matmuls_as_conv_keeps_the_function_and_takes_per_channel_scales(tmp_path):
    import onnxruntime as ort

    from vlm_export.quantize.qnn_qdq import matmuls_as_conv, quantize_for_qnn

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 24)).astype(np.float32) * np.linspace(0.01, 3, 24, dtype=np.float32)  # channels of unequal range
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/blocks.0/q_proj/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 24])], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    assert matmuls_as_conv(tmp_path / "mm.onnx", tmp_path / "conv.onnx") == 1
    x = rng.normal(size=(1, 5, 16)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "conv.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-5)
    quantize_for_qnn(tmp_path / "conv.onnx", tmp_path / "qdq.onnx", [{"x": rng.normal(size=(1, 5, 16)).astype(np.float32)} for _ in range(4)])
    model = onnx.load(str(tmp_path / "qdq.onnx"))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    conv_weight = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and values.get(n.input[0]) is not None
                       and values[n.input[0]].ndim == 4)
    assert values[conv_weight.input[1]].shape == (24,)  # one scale per output channel


def _decomposed_rmsnorm(path: Path, weight: np.ndarray, exponent: float = 2.0) -> None:
    """x -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div(1, .) -> Mul(x, .) -> Mul(weight, .), as the exporter writes it."""
    const = {"two": np.float32(exponent), "eps": np.float32(1e-5), "one": np.float32(1.0)}
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="/blocks.0/input_layernorm/Pow"),
             helper.make_node("ReduceMean", ["sq"], ["ms"], name="/blocks.0/input_layernorm/ReduceMean", axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name="/blocks.0/input_layernorm/Add"),
             helper.make_node("Sqrt", ["mse"], ["rms"], name="/blocks.0/input_layernorm/Sqrt"),
             helper.make_node("Div", ["one", "rms"], ["inv"], name="/blocks.0/input_layernorm/Div"),
             helper.make_node("Mul", ["x", "inv"], ["normed"], name="/blocks.0/input_layernorm/Mul"),
             helper.make_node("Mul", ["w", "normed"], ["y"], name="/blocks.0/input_layernorm/Mul_1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16])],
                              [numpy_helper.from_array(weight, "w"), *(numpy_helper.from_array(np.array(v), k) for k, v in const.items())])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_rmsnorms_fused_keeps_the_function_in_one_op(tmp_path):
    """The decomposed RMSNorm becomes one RMSNormalization (opset 23; the HTP's RmsNorm) with the same
    outputs, which stays one op between Q/DQ pairs after quantization; a Pow that is not a square stays."""
    import onnxruntime as ort

    from vlm_export.quantize.qnn_qdq import quantize_for_qnn, rmsnorms_fused

    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 2.0, 16).astype(np.float32)
    _decomposed_rmsnorm(tmp_path / "rms.onnx", weight)
    assert rmsnorms_fused(tmp_path / "rms.onnx", tmp_path / "fused.onnx") == 1
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert [n.op_type for n in fused.graph.node] == ["RMSNormalization"]
    assert fused.opset_import[0].version == 23
    assert {i.name for i in fused.graph.initializer} == {"w"}  # the chain's constants dropped
    x = (rng.normal(size=(1, 5, 16)) * np.array([1, 1, 1, 1, 300])[None, :, None]).astype(np.float32)  # one outlier row
    (y,) = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * weight
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    quantize_for_qnn(tmp_path / "fused.onnx", tmp_path / "qdq.onnx", [{"x": x}])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "qdq.onnx")).graph.node]
    assert ops.count("RMSNormalization") == 1 and "Pow" not in ops
    _decomposed_rmsnorm(tmp_path / "cube.onnx", weight, exponent=3.0)
    assert rmsnorms_fused(tmp_path / "cube.onnx", tmp_path / "cube-out.onnx") == 0


def test_widen_ranges_keeps_unseen_outliers_unclipped(tmp_path):
    """An MLP activation beyond anything calibration saw is clipped at its calibrated 16-bit range and
    comes through once widen_ranges gives the MLP's tensors a 4x margin (zero points kept); tensors
    outside the MLP keep their scales."""
    import onnxruntime as ort

    from vlm_export.quantize.qnn_qdq import quantize_for_qnn, widen_ranges

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 24)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["/blocks.0/mlp/up_proj/MatMul_output_0"],
                                                name="/blocks.0/mlp/up_proj/MatMul"),
                               helper.make_node("Add", ["/blocks.0/mlp/up_proj/MatMul_output_0", "b"], ["/blocks.0/mlp/y"], name="/blocks.0/mlp/Add")],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 16])],
                              [helper.make_tensor_value_info("/blocks.0/mlp/y", TensorProto.FLOAT, [1, 5, 24])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.full(24, 0.5, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    calibration = [{"x": rng.normal(size=(1, 5, 16)).astype(np.float32)} for _ in range(4)]
    quantize_for_qnn(tmp_path / "mm.onnx", tmp_path / "qdq.onnx", calibration)

    def scales() -> dict:
        model = onnx.load(str(tmp_path / "qdq.onnx"))
        values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        return {n.input[0]: (float(values[n.input[1]]), int(values[n.input[2]])) for n in model.graph.node if n.op_type == "QuantizeLinear"}

    def run(x):
        session = ort.InferenceSession(str(tmp_path / "qdq.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    # inside x's calibrated range, but aligned with weight column 0: that output far beyond its calibrated range
    reach = 0.9 * min(np.abs(c["x"]).max() for c in calibration)
    unseen = np.broadcast_to(reach * np.sign(weight[:, 0]), (1, 5, 16)).astype(np.float32)
    want = unseen @ weight + 0.5
    clipped, before = run(unseen), scales()
    assert widen_ranges(tmp_path / "qdq.onnx") == 2
    after = scales()
    for inside in ("/blocks.0/mlp/up_proj/MatMul_output_0", "/blocks.0/mlp/y_QuantizeLinear_Input"):
        assert after[inside] == pytest.approx((before[inside][0] * 4, before[inside][1]))
    assert after["x"] == before["x"]  # outside the MLP
    widened = run(unseen)
    assert np.abs(widened - want).max() < 0.2 * np.abs(clipped - want).max()


def test_kv_prefix_is_the_template_first_token_and_changes_nothing_in_float(built):
    """The static stage carries the K/V of the template's first token (runtime/kv_prefix.py); the loop
    writes them into the cache instead of running position 0, with the same logits and positions in
    float; a prompt that starts with another token runs as it is."""
    from vlm_export.artifacts import read_manifest
    from vlm_export.runtime.artifact_set import ArtifactSet
    from vlm_export.runtime.generation import Generator, Request

    out, _, _ = built
    static = out / "fp32-static"
    record = read_manifest(static)["kv_prefix"]
    assert record == {"file": "kv_prefix.npz", "tokens": 1}
    with Generator(ArtifactSet.open(static)) as generator:
        embeds, _ = generator.encode(Request.ask("Describe the sky in one word."), None)
        prefix = generator.kv_prefix
        assert prefix is not None and prefix.applies(embeds) and not prefix.applies(embeds[1:])
        with_prefix = generator.start([embeds], 4)
        generator.kv_prefix = None
        without = generator.start([embeds], 4)
        generator.kv_prefix = prefix
        raw = generator.start([embeds[1:]], 4)  # starts otherwise: the prefix goes in front, as an attention sink
        capacity = generator.max_positions()
    np.testing.assert_allclose(with_prefix.logits, without.logits, atol=1e-4)
    assert with_prefix.positions.tolist() == without.positions.tolist() == [embeds.shape[0]]
    np.testing.assert_allclose(raw.logits, without.logits, atol=1e-4)  # here the prefix is the token it dropped
    assert raw.positions.tolist() == [embeds.shape[0]]
    assert capacity == generator.layout.max_positions(generator.artifacts.graphs, 10**9) - 1  # the prefix's slot


@qnn
def test_qnn_variant_runs_through_the_generation_loop(built):
    out, _, _ = built
    result = vlm("run", out / "qnn", "--prompt", "Describe the image.", "--image", "calibration/eval/chelsea.jpg",
                 "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 new" in result.stderr  # the timing line of a finished generation
    assert "LIBNATIVE" not in result.stdout + result.stderr  # the QNN SDK's notice, printed on stdout, filtered
    assert vlm("verify", out / "qnn").returncode == 0


@qnn
def test_each_qnn_and_cpu_stage_is_a_progress_line_and_scored_on_the_default_tokens(built):
    """A log shows what a long sd888 build is doing (a smol build spends ~25 minutes in `qnn`), and
    each variant is scored on EVAL_TOKENS for its weights (tiny: seeded-random, 64)."""
    out, stdout, stderr = built
    for graph in ("vision", "decoder"):
        for what in ("quantizing", "compiling", "measuring"):
            assert f"start  {what} {graph}" in stderr, stderr[-3000:]
            assert re.search(rf"done   {what} {graph}.*\(\d+\.\d s\)", stderr)
    assert "start  recording calibration and held-out feeds" in stderr
    assert "LIBNATIVE" not in stdout + stderr  # the QNN SDK's notice on loading its backend (progress.NATIVE_NOISE)
    report = json.loads((out / "report.json").read_text())
    for variant in ("qnn", "cpu-int8", "cpu-int4"):
        assert f"start  measuring {variant} against fp32 (64 eval tokens" in stderr
        assert report["variants"][variant]["accuracy_vs_fp32"]["tokens"] == 64
        assert report["variants"][variant]["quality_budget"] is None  # seeded-random LLM: measured, not judged
    markdown = (out / "report.md").read_text()
    assert "- qnn, cpu-int8, cpu-int4: measured, not judged against a budget (seeded-random LLM weights" in markdown
    assert "ok (" not in markdown and "OVER" not in markdown


@qnn
def test_diff_takes_the_static_graphs_and_the_qnn_variant_on_the_htp(built, tmp_path):
    """`vlm-export diff fp32-static qnn`: the static graphs against PyTorch per graph (their K/V
    buffers are array slices, which Polygraphy once refused as not contiguous) and the QNN variant
    end to end on the emulated HTP."""
    out, _, _ = built
    result = vlm("diff", out / "fp32-static", out / "qnn", "--eval-tokens", "8", "--new-tokens", "2", "--out", tmp_path / "d")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "d" / "diff.json").read_text())
    assert {"decoder_prefill", "decoder_decode"} <= set(report["graphs"])
    assert report["end_to_end"]["qnn:qnn"]["tokens"] == 8 and report["end_to_end"]["qnn:qnn"]["greedy_prompts"] == 3


def test_cpu_variants_ship_ort_models_and_a_partition_report(built):
    out, _, _ = built
    report = json.loads((out / "report.json").read_text())
    for name, bits in (("cpu-int8", 8), ("cpu-int4", 4)):
        variant = out / name
        assert sorted(p.name for p in (variant / "mobile").glob("*.ort")) == ["decoder_inplace.ort", "embed.ort", "vision.ort"]
        config = (variant / "mobile" / "required_operators_and_types.config").read_text()
        assert "MatMulNBits" in config and "GroupQueryAttention" in config and "/tmp" not in config
        partition = json.loads((variant / "xnnpack_partition.json").read_text())
        vision = next(g for g in partition["graphs"] if g["graph"] == "vision.onnx")
        assert vision["xnnpack_ops"].get("Conv", 0) > 0  # the QDQ convolutions become XNNPACK's QLinearConv
        assert "MatMul" in vision["cpu_ops"]  # 3-D activations: XNNPACK's MatMul takes rank <= 2 only
        record = report["variants"][name]
        assert record["graphs"]["decoder_inplace.onnx"]["bits"] == bits
        assert record["vision_accuracy_vs_fp32"]["cosine_min"] > 0.9
        assert 0 <= record["accuracy_vs_fp32"]["top1_agreement"] <= 1
        assert report["memory"]["variants"][name]["fits_app_budget"]
        assert vlm("verify", variant).returncode == 0


@qnn
def test_a_binary_for_another_soc_is_refused(built, tmp_path):
    from vlm_export.artifacts import read_manifest, verify, write_manifest
    from vlm_export.errors import VlmExportError

    copy = tmp_path / "qnn"
    shutil.copytree(built[0] / "qnn", copy)
    manifest = read_manifest(copy)
    for graph in manifest["graphs"]:
        if graph.get("qnn"):
            graph["qnn"]["soc"] = "SM8650"  # the set now claims a Snapdragon 8 Gen 3
    write_manifest(copy, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(VlmExportError, match="compiled for SM8350 .*not SM8650"):
        verify(copy)


@qnn
def test_a_float_graph_the_htp_cannot_take_is_named(built):
    from vlm_export.errors import VlmExportError
    from vlm_export.runtime.runners.qnn_ep import create_session

    with pytest.raises(VlmExportError, match="does not run entirely on the QNN HTP of SM8350"):
        create_session(built[0] / "fp32-static" / "decoder_decode.onnx", "SM8350")


def test_without_the_qnn_extra_the_cpu_variants_still_build(tmp_path, monkeypatch):
    from tests.checkpoints import tiny_spec
    from vlm_export.errors import MissingExtraError
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec.graph_io import ExportOptions
    from vlm_export.targets.sd888 import target

    export_model(tiny_spec("ldpnet"), tmp_path / "graphs", ExportOptions())
    monkeypatch.setattr(target, "qnn_available", lambda: False)
    with pytest.raises(MissingExtraError, match=r"pip install 'vlm-export\[qnn\]'"):
        target.build(tmp_path / "graphs", tmp_path / "out", target.Profile(variants=("qnn", "cpu-int4"), eval_tokens=2))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"]["qnn"]["built"] is False and "onnxruntime_qnn" in report["variants"]["qnn"]["reason"]
    assert (tmp_path / "out" / "cpu-int4" / "manifest.json").is_file()


@pytest.mark.parametrize("problem", ["no images", "not an image"])
def test_bad_calibration_data_fails_cleanly(tmp_path, problem):
    calibration = tmp_path / "calibration"
    (calibration / "images").mkdir(parents=True)
    shutil.copy("calibration/recipe.json", calibration)
    shutil.copy("calibration/prompts.txt", calibration)
    if problem == "not an image":
        (calibration / "images" / "photo.jpg").write_text("these are not pixels")
    result = vlm("build", "tiny", "--target", "sd888", "--variants", "cpu-int4", "--graphs", tmp_path / "graphs",
                 "--out", tmp_path / "out", "--calibration", calibration)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and ("photo.jpg is not an image" in error[0] or "0 images" in error[0]), error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial*"))


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_xnnpack_partition_follows_the_documented_rules(tmp_path):
    from vlm_export.targets.sd888.xnnpack_partition import partition

    weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    model = _model(
        [helper.make_node("MatMul", ["a2", "w"], ["y2"], name="rank2"),
         helper.make_node("MatMul", ["a3", "w"], ["y3"], name="rank3"),
         helper.make_node("MatMul", ["a2", "b"], ["y4"], name="activation_b"),
         helper.make_node("Softmax", ["y2"], ["s"], name="softmax", axis=-1)],
        [helper.make_tensor_value_info("a2", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("a3", TensorProto.FLOAT, [1, 2, 8]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [8, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y3", "y4", "s")], [weight])
    onnx.save(model, tmp_path / "m.onnx")
    result = partition(Path(tmp_path / "m.onnx"))
    assert result["xnnpack_ops"] == {"MatMul": 1, "Softmax": 1}
    assert result["cpu_ops"] == {"MatMul": 2}


@qnn
def test_vision_only_on_the_npu_keeps_the_dynamic_decoder(tmp_path):
    result = vlm("build", "tiny", "--target", "sd888", "--variants", "qnn", "--qnn-graphs", "vision",
                 "--graphs", tmp_path / "graphs", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "out" / "fp32-static").exists()  # no static export when only vision goes onto the NPU
    manifest = json.loads((tmp_path / "out" / "qnn" / "manifest.json").read_text())
    placement = {g["name"]: bool(g.get("qnn")) for g in manifest["graphs"]}
    assert placement == {"vision": True, "embed": False, "decoder": False}
    run = vlm("run", tmp_path / "out" / "qnn", "--prompt", "Hi", "--image", "calibration/eval/chelsea.jpg", "--max-new-tokens", "3")
    assert run.returncode == 0, run.stderr[-2000:]
