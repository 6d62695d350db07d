"""An exported artifact directory as the runtime sees it: manifest, spec, graphs, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlm_export.artifacts import verify
from vlm_export.errors import VlmExportError
from vlm_export.model.tokenizer import TextTokenizer, load_tokenizer
from vlm_export.runtime.runners import backend_module
from vlm_export.spec.model_spec import ModelSpec, TokenizerSpec, spec_from_dict

TOKENIZER_DIR = "tokenizer"


def tokenizer_spec_in(directory: Path) -> TokenizerSpec:
    # A saved fast tokenizer (tokenizer.json) is authoritative; GGUF-born ones also write a stray
    # tokenizer.model that the slow LLaMA tokenizer cannot read.
    if (directory / "tokenizer.model").is_file() and not (directory / "tokenizer.json").is_file():
        return TokenizerSpec(kind="sentencepiece", path=str(directory / "tokenizer.model"))
    return TokenizerSpec(kind="hf", path=str(directory))


@dataclass
class ArtifactSet:
    directory: Path
    manifest: dict
    spec: ModelSpec

    @classmethod
    def open(cls, directory: str | Path, check_hashes: bool = True) -> "ArtifactSet":
        directory = Path(directory)
        if not directory.is_dir():
            raise VlmExportError(f"artifact directory {directory} does not exist", "run `vlm-export export MODEL` first")
        manifest = verify(directory, check_hashes=check_hashes)
        if "graphs" not in manifest or "model" not in manifest:
            raise VlmExportError(f"{directory}/manifest.json is not a vlm-export graph manifest", "point at an export directory")
        return cls(directory, manifest, spec_from_dict(manifest["model"]))

    @property
    def graphs(self) -> dict[str, dict]:
        return {g["name"]: g for g in self.manifest["graphs"]}

    @property
    def layout(self) -> str:
        decoder = self.graphs.get("decoder") or self.graphs["decoder_decode"]
        return decoder.get("attrs", {}).get("layout", "dynamic")

    def tokenizer(self) -> TextTokenizer:
        return load_tokenizer(tokenizer_spec_in(self.directory / TOKENIZER_DIR))

    def runners(self, backend: str, **options) -> dict:
        module = backend_module(backend)
        options.setdefault("spec", self.spec)
        options.setdefault("engines", self.manifest.get("engines", {}))  # what built engines were built with
        return {name: module.make_runner(graph, self.directory, options) for name, graph in self.graphs.items()}
