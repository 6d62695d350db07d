"""`vlm-export build --target cpu` on tiny: fp32/int8/int4 variants, each a runnable artifact set."""

import json
import subprocess
import sys

import onnx
import pytest

from tests.cli import vlm


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    result = vlm("build", "tiny", "--target", "cpu", "--graphs", root / "graphs", "--out", root / "cpu")
    assert result.returncode == 0, result.stderr
    return root, result.stdout


def test_variants_and_report(built):
    root, stdout = built
    report = json.loads((root / "cpu" / "report.json").read_text())
    assert list(report["variants"]) == ["fp32", "int8", "int4"] and report["layout"] == "inplace"
    for name in ("fp32", "int8", "int4"):
        decoder = onnx.load(str(root / "cpu" / name / "decoder_inplace.onnx"))
        ops = [n.op_type for n in decoder.graph.node]
        # in-place KV: one attention op per layer, and it alone reads the cache (no Concat of K/V)
        assert ops.count("GroupQueryAttention") == 2
        assert {n.op_type for n in decoder.graph.node for i in n.input if i.startswith("past_key_values")} == \
            {"GroupQueryAttention"}
        if name == "fp32":
            continue
        accuracy = report["variants"][name]["accuracy_vs_fp32"]
        assert accuracy["prompts"] == 3 and 0.0 <= accuracy["greedy_prefix_agreement"] <= 1.0
        assert 0.0 <= accuracy["top1_agreement"] <= 1.0 and accuracy["mean_kl"] >= 0.0
        assert "MatMulNBits" in ops
        assert not any(n.op_type == "MatMul" and n.input[1].startswith("onnx::MatMul") for n in decoder.graph.node)
    assert "| int4 |" in stdout
    for name in ("int8", "int4"):  # the quantized variants carry the vision tower in dynamic int8
        vision = onnx.load(str(root / "cpu" / name / "vision.onnx"))
        assert "MatMulInteger" in {n.op_type for n in vision.graph.node}
        assert report["variants"][name]["vision_vs_fp32"]["cosine_min"] > 0.99
    # vision and embed are the exported graphs, linked, not exported a second time
    fp32 = json.loads((root / "cpu" / "fp32" / "manifest.json").read_text())
    assert {g["file"]: bool(g.get("reused_from")) for g in fp32["graphs"]} == \
        {"vision.onnx": True, "embed.onnx": True, "decoder_inplace.onnx": False}


def test_dynamic_layout_variant(built, tmp_path):
    root, _ = built
    result = vlm("build", "tiny", "--target", "cpu", "--layout", "dynamic", "--variants", "fp32,int4",
                 "--graphs", root / "graphs", "--out", tmp_path / "cpu")
    assert result.returncode == 0, result.stderr
    decoder = onnx.load(str(tmp_path / "cpu" / "int4" / "decoder.onnx"))
    assert "GroupQueryAttention" not in [n.op_type for n in decoder.graph.node]


@pytest.mark.parametrize("variant", ["fp32", "int4"])
def test_each_variant_runs(built, variant):
    root, _ = built
    result = vlm("run", root / "cpu" / variant, "--prompt", "hello", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert subprocess.run([sys.executable, "-m", "vlm_export", "verify", str(root / "cpu" / variant)]).returncode == 0


def test_graphs_are_reused(built):
    root, _ = built
    again = vlm("build", "tiny", "--target", "cpu", "--graphs", root / "graphs", "--out", root / "cpu2", "--variants", "fp32")
    assert again.returncode == 0, again.stderr


def test_unknown_target_is_one_line(tmp_path):
    result = vlm("build", "tiny", "--target", "orin-nano-9000", "--out", tmp_path / "x")
    assert result.returncode == 2 and "unknown target 'orin-nano-9000'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_unknown_variant(tmp_path):
    result = vlm("build", "tiny", "--variants", "int3", "--graphs", tmp_path / "g", "--out", tmp_path / "x")
    assert result.returncode == 2 and "unknown CPU variant(s) int3" in result.stderr


@pytest.mark.parametrize("option, value, message", [("--layout", "ring", "unknown CPU decoder layout 'ring'"),
                                                    ("--vision", "int2", "unknown CPU vision precision 'int2'")])
def test_unknown_layout_or_vision_precision(tmp_path, option, value, message):
    result = vlm("build", "tiny", option, value, "--graphs", tmp_path / "g", "--out", tmp_path / "x")
    assert result.returncode == 2 and message in result.stderr and not (tmp_path / "g").exists()
