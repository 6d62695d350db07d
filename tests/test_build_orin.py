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
    report = json.loads((root / "orin" / "report.json").read_text())
    int4 = report["variants"]["int4"]
    assert set(int4["static_check"].values()) == {"ok"}
    assert 0 < int4["accuracy_vs_fp32"]["top1_agreement"] <= 1  # measured in ONNX Runtime against fp32
