"""An exported artifact directory as the runtime sees it: manifest, spec, graphs, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlm_export.artifacts import TOKENIZER_DIR, verify
from vlm_export.errors import VlmExportError
from vlm_export.model.tokenizer import TextTokenizer, load_tokenizer, tokenizer_spec_in
from vlm_export.runtime.runners import backend_module
from vlm_export.spec.graph_io import GraphRole
from vlm_export.spec.layouts import graph_layout
from vlm_export.spec.model_spec import ModelSpec, spec_from_dict


def kv_dtype(decoder: dict) -> np.dtype:
    """The type a decoder record's K/V cache is kept in (int8 for an int8 cache), else its float type."""
    return np.dtype(next((t["dtype"] for t in decoder["inputs"] if t["name"].startswith("past_key_values.")),
                         decoder["inputs"][0]["dtype"]))


@dataclass
class ArtifactSet:
    directory: Path | None  # None: the reference's graphs, not exported (from_spec)
    manifest: dict
    spec: ModelSpec

    @classmethod
    def open(cls, directory: str | Path, check_hashes: bool = True) -> ArtifactSet:
        directory = Path(directory)
        manifest = verify(directory, check_hashes=check_hashes)  # names a missing folder or a build's top folder
        if "graphs" not in manifest or "model" not in manifest:
            raise VlmExportError(f"{directory}/manifest.json is not a vlm-export graph manifest", "point at an export directory")
        return cls(directory, manifest, spec_from_dict(manifest["model"]))

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ArtifactSet:
        """The dynamic-layout graphs of `spec` without their files: enough for the PyTorch backends,
        which run the reference's graph-shaped modules and read no graph file."""
        from vlm_export.spec.graph_io import ExportOptions, graphs_for

        graphs = [g.to_dict() for g in graphs_for(spec, ExportOptions())]
        return cls(None, {"model": spec.to_dict(), "graphs": graphs}, spec)

    @property
    def graphs(self) -> dict[str, dict]:
        return {g["name"]: g for g in self.manifest["graphs"]}

    @property
    def layout(self) -> str:
        """The decoder layout's name (spec/layouts/ registers what each one does)."""
        return graph_layout(next(g for g in self.manifest["graphs"] if g["wrapper"] == GraphRole.DECODER)).name

    def tokenizer(self) -> TextTokenizer:
        if self.directory is None:
            return load_tokenizer(self.spec.tokenizer)
        return load_tokenizer(tokenizer_spec_in(self.directory / TOKENIZER_DIR))

    def runners(self, backend: str, **options) -> dict:
        module = backend_module(backend)
        if self.directory is None and not backend.startswith("torch"):
            raise VlmExportError(f"backend {backend} runs exported graphs, and {self.spec.name} has none here",
                                 f"run `vlm-export export {self.spec.name}` first, or use --backend torch")
        options.setdefault("spec", self.spec)
        options.setdefault("engines", self.manifest.get("engines", {}))  # what built engines were built with
        return {name: module.make_runner(graph, self.directory, options) for name, graph in self.graphs.items()}
