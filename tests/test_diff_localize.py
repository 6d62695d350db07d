"""`vlm-export diff` of one artifact set against PyTorch names the first diverging decoder block
(hooks on the reference's blocks vs the graph's block tensors), on the console and in diff.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from tests.checkpoints import tiny_spec
from tests.cli import vlm
from tests.graph_edits import scale_matmul_weight
from vlm_export.artifacts import write_manifest
from vlm_export.diff.api import diff_artifacts, localisation_lines
from vlm_export.export.pipeline import export_model
from vlm_export.spec.graph_io import ExportOptions


def _rewrite_decoder(directory: Path, file: str, change) -> None:
    """Edit `directory/file` with `change(model)`, then re-hash the manifest (diff checks the files)."""
    path = directory / file
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(path))
    manifest = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, {k: v for k, v in manifest.items() if k != "files"})


def test_perturbed_block_is_named_against_pytorch(tiny_graphs, tmp_path):
    broken = tmp_path / "graphs"
    shutil.copytree(tiny_graphs, broken)
    scale_matmul_weight(broken, "decoder.onnx", "/blocks.1/", 1.5, "/down_proj/")
    result = vlm("diff", broken, "--out", tmp_path / "report", "--new-tokens", "4")
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: diff failed") and "first diverging block: decoder layer 1 against PyTorch" in error
    assert "graphs decoder: first diverging block: decoder layer 1 against PyTorch" in result.stdout
    assert "first diverging block: decoder layer 1 against PyTorch" in (tmp_path / "report" / "diff.md").read_text()
    loc = json.loads((tmp_path / "report" / "diff.json").read_text())["localisation"]["graphs"]["decoder"]
    assert loc["baseline"] == "pytorch" and loc["first_divergence"] == 1
    block0, block1 = loc["blocks"]
    assert block0["hidden"] < 1e-5 < block1["hidden"] and block1["hidden_cosine"] < block0["hidden_cosine"]
    assert block0["mlp_out"] < 1e-5 and block1["mlp_out"] > 0.4  # the scaled weight: 1.5x its MLP output


def test_unperturbed_graphs_pass_without_naming_a_block(tiny_graphs, tmp_path):
    result = vlm("diff", tiny_graphs, "--out", tmp_path / "report", "--new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "graphs decoder: no diverging block against PyTorch" in result.stdout
    assert "first diverging block" not in result.stdout + (tmp_path / "report" / "diff.md").read_text()
    loc = json.loads((tmp_path / "report" / "diff.json").read_text())["localisation"]["graphs"]["decoder"]
    assert loc["first_divergence"] is None and all(b["hidden"] < 1e-5 for b in loc["blocks"])


def test_inplace_decoder_is_localised_against_pytorch(tmp_path):
    graphs = tmp_path / "inplace"
    export_model(tiny_spec("ldpnet"), graphs, ExportOptions(layout="inplace"))
    scale_matmul_weight(graphs, "decoder_inplace.onnx", "/blocks.1/", 1.5, "/down_proj/")
    report = diff_artifacts(graphs, [], tmp_path / "report", new_tokens=2)
    assert not report["passed"]
    assert report["localisation"]["graphs"]["decoder"]["first_divergence"] == 1
    assert localisation_lines(report, named_only=True)[0].startswith("graphs decoder: first diverging block: decoder layer 1")


def test_a_graph_without_block_names_says_it_cannot_be_localised(tiny_graphs, tmp_path):
    anonymous = tmp_path / "graphs"
    shutil.copytree(tiny_graphs, anonymous)

    def drop_names(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            node.name = ""
    _rewrite_decoder(anonymous, "decoder.onnx", drop_names)
    result = vlm("diff", anonymous, "--out", tmp_path / "report", "--new-tokens", "2")
    assert result.returncode == 0, result.stderr  # same numbers; only the map to blocks is gone
    assert "graphs decoder: not localised against PyTorch: decoder.onnx has no /blocks.N/ node names" in result.stdout


def test_reduced_precision_names_a_block_only_for_a_step_change():
    """Quantization error is there from block 0 on; only a jump over it names a block."""
    from vlm_export.diff.localize import _verdict, summary

    def verdict(hidden: list[float], reduced_precision: bool) -> dict:
        errors = {b: {"hidden": e} for b, e in enumerate(hidden)}
        return _verdict(errors, {b: 1.0 for b in errors}, reduced_precision)

    int8 = [0.012, 0.01, 0.0052, 0.0052, 0.0059, 0.014, 0.0055]  # smol's int8 decoder, as bench/reports/diff-smol
    assert verdict(int8, reduced_precision=True)["first_divergence"] is None
    assert verdict(int8, reduced_precision=False)["first_divergence"] == 0  # fp32: any error over 1e-4 is a step
    assert verdict([0.012, 0.01, 0.2, 0.2, 0.2], reduced_precision=True)["first_divergence"] == 2
    assert verdict([0.3, 0.01, 0.01, 0.01, 0.01], reduced_precision=True)["first_divergence"] == 0
    assert "no diverging block against the fp32 graph" in summary(verdict(int8, reduced_precision=True))
    assert "decoder layer 2 against the fp32 graph" in summary(verdict([0.012, 0.01, 0.2, 0.2, 0.2], reduced_precision=True))
