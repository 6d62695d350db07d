"""build.py's ensure_graphs: a build exports only the decoder layout its target builds from, reuses
an export of a layout it takes, and relays out (decoder only) an export of a layout it does not."""

import json
import os
import shutil

import pytest

from tests.checkpoints import tiny_spec
from vlm_export.build import decoder_layout, ensure_graphs
from vlm_export.errors import VlmExportError
from vlm_export.export import pipeline


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture
def dynamic(tiny_graphs, tmp_path):
    """The session's dynamic export of tiny, hard-linked into a folder of this test's own."""
    shutil.copytree(tiny_graphs, tmp_path / "graphs", copy_function=os.link)
    (tmp_path / "graphs" / "manifest.json").unlink()  # a copy of its own: a test rewrites it
    shutil.copy(tiny_graphs / "manifest.json", tmp_path / "graphs" / "manifest.json")
    return tmp_path / "graphs"


def test_an_export_in_a_layout_the_target_takes_is_reused(dynamic, monkeypatch):
    monkeypatch.setattr(pipeline, "export_model", lambda *a, **k: pytest.fail("exported again"))
    assert ensure_graphs(tiny_spec("ldpnet"), dynamic, ("dynamic",)) == dynamic
    assert ensure_graphs(tiny_spec("ldpnet"), dynamic, ("inplace", "dynamic")) == dynamic


def test_another_layout_is_relaid_out_once_beside_it(dynamic, monkeypatch):
    relaid = ensure_graphs(tiny_spec("ldpnet"), dynamic, ("inplace",))
    assert relaid == dynamic.with_name("graphs-inplace") and decoder_layout(_manifest(relaid)) == "inplace"
    graphs = {g["file"]: g.get("reused_from") for g in _manifest(relaid)["graphs"]}
    assert graphs == {"vision.onnx": str(dynamic), "embed.onnx": str(dynamic), "decoder_inplace.onnx": None}
    assert _manifest(relaid)["files"]["vision.onnx"] == _manifest(dynamic)["files"]["vision.onnx"]
    assert decoder_layout(_manifest(dynamic)) == "dynamic"  # the export it came from is left as it was
    monkeypatch.setattr(pipeline, "export_model", lambda *a, **k: pytest.fail("exported again"))
    assert ensure_graphs(tiny_spec("ldpnet"), dynamic, ("inplace",)) == relaid


def test_no_export_yet_exports_the_preferred_layout_only(tmp_path):
    graphs = ensure_graphs(tiny_spec("ldpnet"), tmp_path / "graphs", ("inplace", "dynamic"))
    assert graphs == tmp_path / "graphs" and decoder_layout(_manifest(graphs)) == "inplace"
    assert not (tmp_path / "graphs" / "decoder.onnx").exists()


def test_a_built_variant_is_taken_as_it_is(dynamic, monkeypatch):
    """An artifact set a build wrote (not an export) is never relaid out: the target judges it."""
    manifest = _manifest(dynamic)
    (dynamic / "manifest.json").write_text(json.dumps({**manifest, "kind": "vlm-export build"}))
    monkeypatch.setattr(pipeline, "export_model", lambda *a, **k: pytest.fail("relaid out"))
    monkeypatch.setattr("vlm_export.artifacts.verify", lambda folder: _manifest(folder))
    assert ensure_graphs(tiny_spec("ldpnet"), dynamic, ("inplace",)) == dynamic


def test_graphs_of_another_model_are_refused(dynamic):
    with pytest.raises(VlmExportError, match="holds graphs of another model"):
        ensure_graphs(tiny_spec("ldpnetv2"), dynamic, ("dynamic",))
