"""`vlm-export build --target orin` without TensorRT: static check, plan, script -- and no engine claimed."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.cli import vlm


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("orin")
    result = vlm("build", "tiny", "--target", "orin", "--graphs", root / "graphs", "--out", root / "orin", "--dla")
    assert result.returncode == 0, result.stderr
    return root, result.stdout


def test_says_engines_were_not_built(built):
    root, stdout = built
    assert "engines NOT built" in stdout and "build_engines.sh" in stdout
    assert not list((root / "orin").rglob("*.engine"))
    report = json.loads((root / "orin" / "report.json").read_text())
    assert list(report["variants"]) == ["fp16", "int8", "int4"]
    for variant in report["variants"].values():
        assert variant["engines_built"] == [] and set(variant["static_check"].values()) == {"ok"}
    assert os.access(root / "orin" / "int8" / "build_engines.sh", os.X_OK)
    fp16 = json.loads((root / "orin" / "fp16" / "manifest.json").read_text())
    decoder = next(g for g in fp16["graphs"] if g["name"] == "decoder")
    assert decoder["inputs"][0]["dtype"] == "float16" and decoder["validation"]["passed"]  # exporter's fp16 graphs


def test_int8_is_symmetric_qdq_and_measured(built):
    import onnx
    from onnx import numpy_helper

    root, _ = built
    model = onnx.load(str(root / "orin" / "int8" / "decoder.onnx"))
    values = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(not numpy_helper.to_array(values[n.input[2]]).any() for n in dq if len(n.input) > 2 and n.input[2] in values)
    per_channel = [n for n in dq if n.input[0] in values and numpy_helper.to_array(values[n.input[1]]).size > 1]
    assert per_channel, "weights carry per-channel scales"
    accuracy = json.loads((root / "orin" / "report.json").read_text())["variants"]["int8"]["accuracy_vs_fp32"]
    assert accuracy["prompts"] == 3 and 0 <= accuracy["top1_agreement"] <= 1 and accuracy["mean_kl"] >= 0
    run = vlm("run", root / "orin" / "int8", "--prompt", "hello", "--max-new-tokens", "3")
    assert run.returncode == 0, run.stderr


def _shapes(argument: str) -> dict[str, list[int]]:
    return {name: [int(d) for d in dims.split("x")] for name, dims in (item.rsplit(":", 1) for item in argument.split(","))}


def test_trtexec_lines_match_graph_inputs_and_profiles(built):
    root, _ = built
    variant = root / "orin" / "int8"
    manifest = json.loads((variant / "manifest.json").read_text())
    graphs = {g["file"]: g for g in manifest["graphs"]}
    plan = {p["graph"]: p for p in json.loads((variant / "plan.json").read_text())["plans"]}
    lines = [line.strip() for line in (variant / "build_engines.sh").read_text().splitlines() if line.strip().startswith("trtexec")]
    assert len(lines) == len(graphs)
    for line in lines:
        graph_file = re.search(r"--onnx=(\S+)", line).group(1)
        graph = graphs[graph_file]
        mins = [_shapes(a) for a in re.findall(r"--minShapes=(\S+)", line)]
        maxs = [_shapes(a) for a in re.findall(r"--maxShapes=(\S+)", line)]
        assert len(mins) == len(plan[graph_file]["profiles"])
        for low, high in zip(mins, maxs):
            assert list(low) == [t["name"] for t in graph["inputs"]]  # exactly the graph's inputs, in order
            for tensor in graph["inputs"]:
                for axis, dim in enumerate(tensor["shape"]):
                    if isinstance(dim, int):
                        assert low[tensor["name"]][axis] == high[tensor["name"]][axis] == dim
                    else:
                        assert low[tensor["name"]][axis] <= high[tensor["name"]][axis]
    decoder = next(line for line in lines if "--onnx=decoder.onnx" in line)
    prefill, decode = (_shapes(a) for a in re.findall(r"--maxShapes=(\S+)", decoder))
    assert prefill["past_key_values.0.key"][2] == 0 and decode["inputs_embeds"][1] == 1
    assert decode["attention_mask"][1] == 512  # clamped to tiny's context
    assert "--useDLACore=0" in next(line for line in lines if "--onnx=vision.onnx" in line)
    assert "--int8" in decoder and "--fp16" in decoder


def test_static_check_refuses_ops_tensorrt_cannot_parse(built, tmp_path):
    root, _ = built
    cpu = vlm("build", "tiny", "--target", "cpu", "--graphs", root / "graphs", "--out", tmp_path / "cpu", "--variants", "fp32,int4")
    assert cpu.returncode == 0, cpu.stderr
    result = vlm("build", "tiny", "--target", "orin", "--graphs", tmp_path / "cpu" / "int4", "--out", tmp_path / "orin")
    # ONNX Runtime's own ops (GroupQueryAttention, MatMulNBits) are named, nothing is written
    assert result.returncode == 2 and "com.microsoft.GroupQueryAttention" in result.stderr
    assert not (tmp_path / "orin").exists()


def test_bad_orin_options(tmp_path):
    result = vlm("build", "tiny", "--target", "orin", "--device", "orin-nano-8gb", "--dla", "--out", tmp_path / "o")
    assert result.returncode == 2 and "has no DLA core" in result.stderr
    result = vlm("build", "tiny", "--target", "cpu", "--device", "agx-orin-64gb", "--out", tmp_path / "o")
    assert result.returncode == 2 and "does not apply to --target cpu" in result.stderr


def test_int4_is_blocked_weight_only_dequantize_that_runs_in_ort(built):
    import onnx

    root, _ = built
    decoder = onnx.load(str(root / "orin" / "int4" / "decoder.onnx"), load_external_data=False)
    assert next(o.version for o in decoder.opset_import if o.domain == "") == 21
    weights = {i.name: i.data_type for i in decoder.graph.initializer}
    blocked = [n for n in decoder.graph.node if n.op_type == "DequantizeLinear"]
    assert blocked and all(weights[n.input[0]] == onnx.TensorProto.INT4 for n in blocked)
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in blocked)
    assert not any(n.op_type == "MatMulNBits" for n in decoder.graph.node)  # standard ONNX only, for TensorRT
    done = json.loads((root / "orin" / "int4" / "manifest.json").read_text())["quantization"]["decoder.onnx"]
    # tiny's seeded weights are float: AWQ scales on every norm's projections, min/max blocks with offsets
    assert done["awq_norm_groups"] == 4 and done["awq_groups_held_exactly"] == 0
    assert done["awq_calibration_error"] <= done["awq_calibration_error_rtn"]
    assert done["block_offset_terms"] == done["int4_blocked_dequantize"] == 14  # 2 layers x 7 projections
    report = json.loads((root / "orin" / "report.json").read_text())
    int4 = report["variants"]["int4"]
    assert set(int4["static_check"].values()) == {"ok"}
    assert 0 < int4["accuracy_vs_fp32"]["top1_agreement"] <= 1  # measured in ONNX Runtime against fp32


def _plans(root, variant: str) -> dict:
    return {p["graph"]: p for p in json.loads((root / "orin" / variant / "plan.json").read_text())["plans"]}


def test_fp16_engines_are_strongly_typed_and_quantized_ones_pin_the_float32_islands(built):
    """TensorRT's --fp16 may run RMSNorm, softmax and rotary in fp16: the fp16 variant is built as a
    strongly typed network (its graphs carry their fp32 islands), int8/int4 pin the islands by name."""
    root, _ = built
    fp16 = (root / "orin" / "fp16" / "build_engines.sh").read_text()
    trtexec = [line for line in fp16.splitlines() if line.strip().startswith("trtexec")]
    assert trtexec and all("--stronglyTyped" in line and "--fp16" not in line for line in trtexec)
    assert all("--strongly-typed" in line for line in fp16.splitlines() if line.strip().startswith("polygraphy convert"))
    islands = _plans(root, "int8")["decoder.onnx"]["fp32_layers"]
    for expected in ("/blocks.0/input_layernorm/Pow", "/blocks.1/post_attention_layernorm/ReduceMean", "/norm/Sqrt",
                     "/blocks.0/Softmax", "/blocks.0/Neg", "/blocks.0/Neg_1"):
        assert expected in islands
    assert not [n for n in islands if "MatMul" in n or "proj" in n]  # the matmuls stay int8 / fp16
    rotary = [n for n in islands if "/blocks.0/" in n and "layernorm" not in n and "Softmax" not in n]
    assert len(rotary) == 2 * 7  # q and k: Add, two Muls, Concat, Neg, two Slices
    int8 = (root / "orin" / "int8" / "build_engines.sh").read_text()
    decoder = next(line for line in int8.splitlines() if "--onnx=decoder.onnx" in line)
    assert "--int8 --fp16 --precisionConstraints=obey" in decoder
    assert "/blocks.0/input_layernorm/Pow:fp32," in decoder and "/blocks.0/Softmax:fp32" in decoder
    converted = next(line for line in int8.splitlines() if "polygraphy convert decoder.onnx" in line)
    assert "--precision-constraints obey --layer-precisions" in converted and "/blocks.0/Softmax:float32" in converted


def test_in_process_build_is_configured_like_the_script(built, monkeypatch):
    """Without TensorRT here, the in-process build runs against stand-ins that record what it asks for."""
    import sys
    import types

    import polygraphy.backend.trt as polygraphy_trt

    from vlm_export.targets.orin import target

    calls = []
    fake_trt = types.SimpleNamespace(float32="float32", MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
                                     __version__="10.x (stand-in)")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)

    class Profile(dict):
        def add(self, name, *shapes):
            self[name] = shapes

    def record(kind):
        return lambda *args, **kwargs: calls.append((kind, args, kwargs)) or (kind, args, kwargs)

    monkeypatch.setattr(polygraphy_trt, "Profile", Profile)
    for kind in ("CreateConfig", "NetworkFromOnnxPath", "SetLayerPrecisions", "EngineFromNetwork"):
        monkeypatch.setattr(polygraphy_trt, kind, record(kind))
    monkeypatch.setattr(polygraphy_trt, "SaveEngine", lambda engine, path: lambda: None)
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stand-in")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 7))
    root, _ = built
    for variant, strongly_typed in (("fp16", True), ("int8", False)):
        calls.clear()
        plans = list(_plans(root, variant).values())
        target._build_engines(root / "orin" / variant, [p for p in plans if p["graph"] == "decoder.onnx"])
        by_kind = {kind: (args, kwargs) for kind, args, kwargs in calls}
        assert by_kind["NetworkFromOnnxPath"][1]["strongly_typed"] is strongly_typed
        config = by_kind["CreateConfig"][1]
        if strongly_typed:  # no precision flags on a strongly typed network, no per-layer pins
            assert not config["fp16"] and not config["int8"] and "SetLayerPrecisions" not in by_kind
        else:
            assert config["fp16"] and config["int8"] and config["precision_constraints"] == "obey"
            pinned = by_kind["SetLayerPrecisions"][0][1]
            assert "/blocks.0/Softmax" in pinned and set(pinned.values()) == {"float32"}


def test_reports_say_simulated_and_golden_files_check_with_polygraphy(built):
    """The quality columns are ONNX Runtime on the variant's graphs, labelled so; the golden files and the
    printed Polygraphy line reproduce those outputs (here with ONNX Runtime standing in for the engine)."""
    import subprocess
    import sys
    from pathlib import Path

    root, _ = built
    report = json.loads((root / "orin" / "report.json").read_text())
    assert report["variants"]["int8"]["measured_on"].startswith("simulated")
    markdown = (root / "orin" / "report.md").read_text()
    assert "| int8 |" in markdown and "simulated (ONNX Runtime on the variant's graphs, not the engine)" in markdown
    assert "./check_engines.sh" in markdown
    variant = root / "orin" / "int8"
    script = (variant / "check_engines.sh").read_text().splitlines()
    lines = [line for line in script if line.startswith("polygraphy run")]
    assert {Path(line.split()[2]).name for line in lines} == {"vision.engine", "embed.engine", "decoder.engine"}
    assert any("--optimization-profile 1" in line and "decoder-decode" in line for line in lines)
    polygraphy = Path(sys.executable).with_name("polygraphy")
    for line in lines:
        args = line.split()
        engine = args[2]
        args = [str(polygraphy), "run", engine.replace(".engine", ".onnx"), "--onnxrt",
                *[a for a in args[3:] if a not in ("--model-type", "engine", "--trt")]]
        index = args.index("--optimization-profile")
        del args[index:index + 2]
        done = subprocess.run(args, check=False, cwd=variant, capture_output=True, text=True)
        assert done.returncode == 0 and "PASSED" in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]


def test_int8_decoder_is_smoothed_then_quantized_on_its_attention_only(built, tmp_path):
    """SmoothQuant folds its scales into the RMSNorm and projection weights (the float graph computes
    the same function), then only the attention projections take int8 Q/DQ; the MLP and lm_head stay float."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from vlm_export.quantize.calibration import calibration_set, decoder_samples
    from vlm_export.quantize.qdq_int8 import DECODER_KEEP_FLOAT
    from vlm_export.quantize.smooth import smooth_quant

    root, _ = built
    rewrites = json.loads((root / "orin" / "int8" / "manifest.json").read_text())["rewrites"]["decoder.onnx"]
    assert rewrites["smoothed_norms"] == 2 and rewrites["smoothed_matmuls"] == 6  # tiny: 2 layers x q, k, v
    model = onnx.load(str(root / "orin" / "int8" / "decoder.onnx"), load_external_data=False)
    quantized = {n.input[0].rsplit("_DequantizeLinear", 1)[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and "proj" in n.name or "lm_head" in n.name]
    for node in matmuls:
        int8 = any(i.endswith("_DequantizeLinear_Output") for i in node.input)
        assert int8 == ("/mlp/" not in node.name and "lm_head" not in node.name), node.name
    assert quantized
    samples = decoder_samples(root / "graphs", *calibration_set(None))
    smooth_quant(root / "graphs" / "decoder.onnx", tmp_path / "decoder.onnx", samples, skip=DECODER_KEEP_FLOAT)
    before = ort.InferenceSession(str(root / "graphs" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for feed in samples[:4]:
        np.testing.assert_allclose(after.run(["logits"], feed)[0], before.run(["logits"], feed)[0], atol=1e-5, rtol=1e-4)


def test_a_missed_budget_says_why_and_is_not_recommended():
    from vlm_export.targets.orin.target import report_markdown
    from vlm_export.targets.recipe import recommended

    def variant(passed, line):
        return {"bytes": 1e6, "static_check": {"decoder.onnx": "ok"}, "engines_built": [],
                "quality_budget": {"passed": passed, "line": line}}

    variants = {"fp16": {"bytes": 1e6, "static_check": {"decoder.onnx": "ok"}, "engines_built": []},
                "int8": variant(True, "within the gpu-int8 budget: mean KL 0.0153 <= 0.02"),
                "int4": variant(False, "OVER the gpu-int4 budget: mean KL 0.2585 > 0.015")}
    from vlm_export.targets.orin.profile import RECIPES

    assert recommended(RECIPES, variants) == "int8"
    text = report_markdown({"device": "agx-orin-64gb", "variants": variants})
    assert "- int4: OVER the gpu-int4 budget: mean KL 0.2585 > 0.015\n" in text  # no known reason declared
    from dataclasses import replace

    from vlm_export.targets.recipe import budget_lines

    explained = {**RECIPES, "int4": replace(RECIPES["int4"], over_budget_why="a measured reason")}
    assert "- int4: OVER the gpu-int4 budget: mean KL 0.2585 > 0.015 -- why: a measured reason" in budget_lines(explained, variants)
    assert "Recommended: int8 (the lowest-precision variant within its quality budget)." in text
    variants["int8"] = variant(False, "OVER")
    assert recommended(RECIPES, variants) == "fp16"  # not judged: within
