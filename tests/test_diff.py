"""`vlm-export diff` on tiny: Polygraphy per-graph diffs, golden files, layer localisation, end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import tiny_spec
from tests.cli import vlm
from tests.graph_edits import scale_matmul_weight
from vlm_export.export.pipeline import export_model
from vlm_export.spec.graph_io import ExportOptions


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "tiny"
    export_model(tiny_spec("ldpnet"), out, ExportOptions())
    return out


def test_diff_passes_and_writes_reports(graphs, tmp_path):
    result = vlm("diff", graphs, "--out", tmp_path / "report", "--new-tokens", "8")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "diff.json").read_text())
    assert report["schema"] == 1 and report["passed"]
    stats = report["graphs"]["decoder"]["graphs"]["outputs"]["logits"]
    assert stats["max_abs_diff"] < 1e-4 and stats["cosine"] > 0.99999 and {"mean_abs_diff", "median_abs_diff"} <= set(stats)
    e2e = report["end_to_end"]["graphs"]
    assert e2e["identical_outputs"] == e2e["prompts"] and e2e["top1_agreement"] == 1.0 and e2e["mean_kl"] < 1e-8
    assert e2e["perplexity_reference"] == pytest.approx(e2e["perplexity_candidate"], rel=1e-5)
    assert "PASSED" in result.stdout


def test_golden_files_rerun_with_polygraphy(graphs, tmp_path):
    assert vlm("diff", graphs, "--out", tmp_path / "r").returncode == 0
    command = json.loads((tmp_path / "r" / "diff.json").read_text())["golden"]["decoder"].split()
    polygraphy = str(Path(sys.executable).parent / "polygraphy")
    result = subprocess.run([polygraphy, *command[1:]], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "PASSED" in result.stdout + result.stderr


def test_perturbed_layer_fails_and_is_named(graphs, tmp_path):
    broken = tmp_path / "perturbed"
    shutil.copytree(graphs, broken)
    scale_matmul_weight(broken, "decoder.onnx", "/blocks.1/", 1.5, "/down_proj/")
    result = vlm("diff", graphs, broken, "--out", tmp_path / "report", "--new-tokens", "4")
    assert result.returncode == 1
    assert "diff failed" in result.stderr and "decoder" in result.stderr.strip().splitlines()[-1]
    report = json.loads((tmp_path / "report" / "diff.json").read_text())
    localisation = report["localisation"]["fp32:perturbed"]["decoder"]
    assert localisation["first_divergence"] == 1
    assert localisation["blocks"][0]["hidden"] < 1e-5 < localisation["blocks"][1]["hidden"]
