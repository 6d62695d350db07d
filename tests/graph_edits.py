"""Deliberate faults in built graphs, for tests that must see a diff or a budget fail."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from onnx import numpy_helper

from vlm_export.artifacts import write_manifest


def scale_matmul_weight(directory: Path, file: str, node_prefix: str, factor: float, part: str = "") -> None:
    """Multiplies the constant weight of the first MatMul whose name starts with `node_prefix` (and
    contains `part`) in `directory/file` by `factor`, then re-hashes the manifest (diff checks files)."""
    path = directory / file
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name.startswith(node_prefix) and part in n.name)
    weight = next(i for i in model.graph.initializer if i.name == node.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor, weight.name))
    onnx.save(model, str(path))
    manifest = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, {k: v for k, v in manifest.items() if k != "files"})
