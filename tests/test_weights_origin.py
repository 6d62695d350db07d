"""Seeded-random parts are said out loud: a note beside image answers, and trained/random per part in inspect."""

from __future__ import annotations

import dataclasses

import pytest

from tests.checkpoints import tiny_spec
from tests.cli import vlm
from vlm_export.describe import weight_origins
from vlm_export.spec.model_spec import WeightsSpec

SMOL_LIKE = WeightsSpec(source="gguf", path="model.gguf", random_parts=("vision_tower", "mm_projector"))
SMOL_NOTE = ("note: smol's vision tower and projector are seeded-random, not trained: its answers about images are "
             "meaningless (bring a real MobileVLM checkpoint for those)")
TINY_NOTE = "note: tiny's weights are all seeded-random, not trained: its answers about images (and its text) are meaningless"


def test_trained_llm_with_random_vision_is_noted():
    spec = dataclasses.replace(tiny_spec("ldpnet"), name="smol", weights=SMOL_LIKE)
    assert spec.random_image_note() == SMOL_NOTE
    assert weight_origins(spec) == {"vision_tower": "seeded-random", "projector": "seeded-random", "llm": "trained"}


def test_a_checkpoint_is_trained_throughout_and_not_noted():
    spec = dataclasses.replace(tiny_spec("ldpnet"), weights=WeightsSpec(source="checkpoint", path="ckpt"))
    assert spec.random_image_note() is None
    assert set(weight_origins(spec).values()) == {"trained"}


def test_inspect_shows_which_parts_are_random(v2_checkpoint):
    random_preset = vlm("inspect", "tiny", check=True).stdout
    assert "  vision tower         175,296            seeded-random" in random_preset
    assert "  LLM                  139,584  (0.00 B)  seeded-random" in random_preset
    checkpoint = vlm("inspect", str(v2_checkpoint), check=True).stdout
    assert "seeded-random" not in checkpoint
    assert [line.split()[-1] for line in checkpoint.splitlines() if line.startswith(("  vision tower", "  projector", "  LLM"))] \
        == ["trained"] * 3


def test_generate_with_an_image_prints_the_note(photo):
    result = vlm("generate", "tiny", "--image", photo, "--prompt", "What is this?", "--max-new-tokens", "2", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert TINY_NOTE in result.stderr.splitlines()


def test_generate_without_an_image_prints_no_note():
    result = vlm("generate", "tiny", "--prompt", "Hello", "--max-new-tokens", "2", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert "seeded-random" not in result.stderr


@pytest.fixture(scope="module")
def tiny_graphs(tmp_path_factory):
    from vlm_export.export.pipeline import export_model
    from vlm_export.spec import resolve_spec
    from vlm_export.spec.graph_io import ExportOptions

    out = tmp_path_factory.mktemp("weights_origin") / "graphs"
    manifest = export_model(resolve_spec("tiny"), out, ExportOptions())
    assert manifest["model"]["weights"]["source"] == "random"  # what `run` reads the note from
    return out


def test_run_with_an_image_prints_the_note(tiny_graphs, photo):
    result = vlm("run", tiny_graphs, "--image", photo, "--prompt", "What is this?", "--max-new-tokens", "2", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert TINY_NOTE in result.stderr.splitlines()
