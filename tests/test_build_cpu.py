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
    assert list(report["variants"]) == ["fp32", "int8", "int4"]
    for name in ("int8", "int4"):
        accuracy = report["variants"][name]["accuracy_vs_fp32"]
        assert accuracy["prompts"] == 3 and 0.0 <= accuracy["greedy_prefix_agreement"] <= 1.0
        assert 0.0 <= accuracy["top1_agreement"] <= 1.0 and accuracy["mean_kl"] >= 0.0
        decoder = onnx.load(str(root / "cpu" / name / "decoder.onnx"))
        assert any(n.op_type == "MatMulNBits" for n in decoder.graph.node)
        assert not any(n.op_type == "MatMul" and n.input[1].startswith("onnx::MatMul") for n in decoder.graph.node)
    assert "| int4 |" in stdout


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
