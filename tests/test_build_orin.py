"""`vlm-export build --target orin` without TensorRT: static check, plan, script -- and no engine claimed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest


def vlm(*args):
    return subprocess.run([sys.executable, "-m", "vlm_export", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("orin")
    result = vlm("build", "tiny", "--target", "orin", "--graphs", root / "graphs", "--out", root / "orin", "--dla")
    assert result.returncode == 0, result.stderr
    return root, result.stdout


def test_says_engines_were_not_built(built):
    root, stdout = built
    assert "engines NOT built" in stdout and "build_engines.sh" in stdout
    assert not list((root / "orin").glob("*.engine"))
    report = json.loads((root / "orin" / "report.json").read_text())
    assert report["engines_built"] == [] and report["static_check_passed"]
    assert os.access(root / "orin" / "build_engines.sh", os.X_OK)


def _shapes(argument: str) -> dict[str, list[int]]:
    return {name: [int(d) for d in dims.split("x")] for name, dims in (item.rsplit(":", 1) for item in argument.split(","))}


def test_trtexec_lines_match_graph_inputs_and_profiles(built):
    root, _ = built
    manifest = json.loads((root / "orin" / "manifest.json").read_text())
    graphs = {g["file"]: g for g in manifest["graphs"]}
    plan = {p["graph"]: p for p in json.loads((root / "orin" / "plan.json").read_text())["plans"]}
    lines = [line.strip() for line in (root / "orin" / "build_engines.sh").read_text().splitlines() if line.strip().startswith("trtexec")]
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


def test_static_check_refuses_ops_tensorrt_cannot_parse(built, tmp_path):
    root, _ = built
    cpu = vlm("build", "tiny", "--target", "cpu", "--graphs", root / "graphs", "--out", tmp_path / "cpu", "--variants", "fp32,int4")
    assert cpu.returncode == 0, cpu.stderr
    result = vlm("build", "tiny", "--target", "orin", "--graphs", tmp_path / "cpu" / "int4", "--out", tmp_path / "orin")
    assert result.returncode == 2 and "MatMulNBits" in result.stderr and not (tmp_path / "orin").exists()


def test_bad_orin_options(tmp_path):
    result = vlm("build", "tiny", "--target", "orin", "--device", "orin-nano-8gb", "--dla", "--out", tmp_path / "o")
    assert result.returncode == 2 and "has no DLA core" in result.stderr
    result = vlm("build", "tiny", "--target", "cpu", "--device", "agx-orin-64gb", "--out", tmp_path / "o")
    assert result.returncode == 2 and "does not apply to --target cpu" in result.stderr
