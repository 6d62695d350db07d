"""Shared fixtures: tiny models and synthetic checkpoints in the official MobileVLM layout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# imported only after the settings above, in case a library it loads reads them on import
from tests.checkpoints import tiny_spec, write_checkpoint


@pytest.fixture(scope="session")
def photo() -> Path:
    """A real photo bundled with scikit-image (chelsea the cat)."""
    import skimage

    return Path(skimage.__file__).parent / "data" / "chelsea.png"


@pytest.fixture(scope="session")
def tiny_model():
    from vlm_export.model.load import load_reference

    return load_reference(tiny_spec("ldpnet"))


@pytest.fixture(scope="session")
def v2_checkpoint(tmp_path_factory) -> Path:
    """Tiny V2 (LDPv2) checkpoint: sharded safetensors, bf16, vision tower inside."""
    return write_checkpoint(tmp_path_factory.mktemp("v2"), "ldpnetv2", fmt="safetensors", shards=3, bf16=True)


@pytest.fixture(scope="session")
def v1_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny V1 (LDP) checkpoint: sharded .bin, vision tower in a separate CLIP directory."""
    root = tmp_path_factory.mktemp("v1")
    ckpt = write_checkpoint(root, "ldpnet", fmt="bin", shards=2, separate_vision=True)
    return ckpt, root / "clip"


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory) -> Path:
    """`tiny` exported once for the session (dynamic layout): the runtime's edge-case tests share it."""
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec.graph_io import ExportOptions

    out = tmp_path_factory.mktemp("tiny") / "graphs"
    export_model(tiny_spec("ldpnet"), out, ExportOptions())
    return out
